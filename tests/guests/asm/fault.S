/* fault — proves that a guest crash is reported as a crash: prints `PORTHOLE-FAULT-START`, then executes
 * ud2. start.S's exception handler prints
 *     PORTHOLE-GUEST-EXCEPTION vector=0x06 error=0x00000000 rip=0x...
 * and triple-faults on purpose (empty IDT, then ud2 again), so the VMM must see a shutdown / triple fault
 * and report a crashed guest, not a power-off. Under QEMU, -no-reboot turns the triple fault into an exit.
 */
    .text
    .code64
    .globl guest_main
guest_main:
    leaq msg(%rip), %rdi
    call serial_puts
    ud2
    ret                             /* not reached */

    .section .rodata
msg:
    .asciz "PORTHOLE-FAULT-START\n"
