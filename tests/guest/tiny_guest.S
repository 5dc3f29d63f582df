/*
 * banger's tiny test guest: the smallest "kernel" real Firecracker will boot.
 *
 * Firecracker loads this ELF's PT_LOAD segments at their physical addresses and enters e_entry in
 * 64-bit long mode (identity-mapped first GiB, interrupts off). We:
 *   1. write "banger-guest: ready boot_id=<16 hex digits of rdtsc>\n" to COM1 (0x3f8), one `out`
 *      per byte (string I/O would reach the UART as one multi-byte access, which it drops);
 *   2. wait for Ctrl+Alt+Del: with interrupts off `hlt` would never wake, so we poll the i8042
 *      status port (0x64) between short `pause` spins, and when Firecracker's SendCtrlAltDel puts
 *      a scancode there we ask the i8042 to reset the CPU (0xfe to 0x64), which makes Firecracker
 *      exit 0 exactly as it does when a Linux guest reboots;
 *   3. after that request, `hlt` forever.
 */
        .code64
        .text
        .globl _start
_start:
        rdtsc                           /* edx:eax = TSC, different on every boot */
        shl     $32, %rdx
        or      %rax, %rdx
        mov     %rdx, %r8

        mov     $0x3f8, %dx
        lea     prefix(%rip), %rsi
        mov     $prefix_len, %ecx
1:      mov     (%rsi), %al
        out     %al, %dx
        inc     %rsi
        dec     %ecx
        jnz     1b

        mov     $16, %ecx               /* 16 hex digits, most significant first */
2:      rol     $4, %r8
        mov     %r8b, %al
        and     $0xf, %al
        add     $'0', %al
        cmp     $'9', %al
        jbe     3f
        add     $('a' - '9' - 1), %al
3:      out     %al, %dx
        dec     %ecx
        jnz     2b
        mov     $'\n', %al
        out     %al, %dx

4:      mov     $0x40000, %ecx          /* spin a little between polls: each `in` is a VM exit */
5:      pause
        dec     %ecx
        jnz     5b
        in      $0x64, %al              /* i8042 status: bit 0 = output buffer full */
        test    $1, %al
        jz      4b
        in      $0x60, %al              /* take the scancode */
        mov     $0xfe, %al              /* pulse the CPU reset line */
        out     %al, $0x64

6:      hlt
        jmp     6b

prefix: .ascii  "banger-guest: ready boot_id="
        .set    prefix_len, . - prefix

        .section .note.GNU-stack, "", @progbits
