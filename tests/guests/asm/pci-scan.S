/* pci-scan — lists the devices on PCI bus 0 (function 0 of each slot) on COM1 and powers off, so that tests
 * can see which devices a VM has (e.g. the virtio-input tablet and keyboard, 1af4:1052).
 *
 * Serial (COM1), one line per device, then a last line:
 *   PCI slot=<decimal> id=<vendor hex4>:<device hex4> class=<class hex2><subclass hex2>
 *   PCI-SCAN-DONE devices=<n>
 */
    .text
    .globl guest_main
guest_main:
    pushq %rbx
    pushq %r12
    xorl %ebx, %ebx             /* slot */
    xorl %r12d, %r12d           /* devices found */
1:  cmpl $32, %ebx
    jae 3f
    movl %ebx, %edi
    shll $11, %edi
    orl $0x80000000, %edi
    call pci_read               /* register 0: device << 16 | vendor */
    cmpw $0xFFFF, %ax
    je 2f
    pushq %rax
    leaq slot_text(%rip), %rdi
    call serial_puts
    movl %ebx, %edi
    call serial_putdec
    leaq id_text(%rip), %rdi
    call serial_puts
    movq (%rsp), %rdi
    andl $0xFFFF, %edi
    movl $4, %esi
    call serial_puthex
    movl $':', %edi
    call serial_putc
    popq %rdi
    shrl $16, %edi
    movl $4, %esi
    call serial_puthex
    leaq class_text(%rip), %rdi
    call serial_puts
    movl %ebx, %edi
    shll $11, %edi
    orl $0x80000008, %edi
    call pci_read               /* register 8: class << 24 | subclass << 16 | … */
    movl %eax, %edi
    shrl $16, %edi
    movl $4, %esi
    call serial_puthex
    movl $'\n', %edi
    call serial_putc
    incl %r12d
2:  incl %ebx
    jmp 1b
3:  leaq done_text(%rip), %rdi
    call serial_puts
    movl %r12d, %edi
    call serial_putdec
    movl $'\n', %edi
    call serial_putc
    popq %r12
    popq %rbx
    ret

    .section .rodata
slot_text:
    .asciz "PCI slot="
id_text:
    .asciz " id="
class_text:
    .asciz " class="
done_text:
    .asciz "PCI-SCAN-DONE devices="
