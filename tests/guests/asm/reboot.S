/* reboot — proves that a guest-requested reset (0xFE to the i8042 command port 0x64) restarts the VM and
 * that CMOS NVRAM survives the reset.
 *
 * CMOS byte 0x40 is a boot counter: read, add 1, write back, print `PORTHOLE-BOOT <n>`. While n < 2 the
 * guest resets the machine (then waits in cli; hlt); on the second boot it prints `PORTHOLE-REBOOT-OK`
 * and powers off. A fresh VM (NVRAM zero) therefore prints:
 *     PORTHOLE-BOOT 1
 *     PORTHOLE-BOOT 2
 *     PORTHOLE-REBOOT-OK
 * Under QEMU run it without -no-reboot. If the reset does nothing within ~1 s (timed with the PIT) it
 * prints `PORTHOLE-REBOOT-FAIL reset ignored` and powers off.
 */
    .set BOOT_COUNTER, 0x40

    .text
    .code64
    .globl guest_main
guest_main:
    pushq %rbx
    movl $BOOT_COUNTER, %edi
    call cmos_read
    incb %al
    movzbl %al, %ebx
    movl $BOOT_COUNTER, %edi
    movl %ebx, %esi
    call cmos_write
    leaq msg_boot(%rip), %rdi
    call serial_puts
    movl %ebx, %edi
    call serial_putdec
    movl $'\n', %edi
    call serial_putc
    cmpl $2, %ebx
    jae 2f

    /* Pulse the reset line through the keyboard controller. */
    call pit_ticks_start
    movl $0x64, %edx
    movb $0xFE, %al
    outb %al, %dx
    /* A real reset never comes back here; give it 1 s, then report. */
    movl $1000000, %edi
    call delay_us
    leaq msg_ignored(%rip), %rdi
    call serial_puts
    popq %rbx
    ret

2:  leaq msg_ok(%rip), %rdi
    call serial_puts
    popq %rbx
    ret

    .section .rodata
msg_boot:
    .asciz "PORTHOLE-BOOT "
msg_ok:
    .asciz "PORTHOLE-REBOOT-OK\n"
msg_ignored:
    .asciz "PORTHOLE-REBOOT-FAIL reset ignored\n"
