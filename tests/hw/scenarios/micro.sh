# Scenario 1: the micro-guests this machine's PVM KVM cannot run: ring 3 with iretq, int and syscall;
# x87/SSE/AVX state with XSAVE across context switches; SMP on 4 vCPUs. The xsave guest runs on the QEMU
# peer too (first), so that a failure on porthole-vmm can be told from one of the L1 environment.
. "${HW:=/hw}/scenarios/_lib.sh"
run micro-ring3 porthole-vmm --name ring3 --memory 64 --kernel "$G/micro/ring3.elf"
run micro-xsave-qemu qemu_peer -M microvm -m 64 -kernel "$G/micro/xsave.elf" \
    -device isa-debug-exit,iobase=0xf4,iosize=0x04
run micro-xsave porthole-vmm --name xsave --memory 64 --kernel "$G/micro/xsave.elf"
run micro-smp porthole-vmm --name smp --memory 64 --cpus 4 --kernel "$G/micro/smp.elf"
