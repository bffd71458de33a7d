# Scenario 1: the micro-guests this machine's PVM KVM cannot run: ring 3 with iretq, int and syscall;
# x87/SSE/AVX state with XSAVE across context switches; SMP on 4 vCPUs.
. "${HW:=/hw}/scenarios/_lib.sh"
for g in ring3 xsave; do
    run "micro-$g" porthole-vmm --name "$g" --memory 64 --kernel "$G/micro/$g.elf"
done
run micro-smp porthole-vmm --name smp --memory 64 --cpus 4 --kernel "$G/micro/smp.elf"
