/*
 * banger's flooding test guest: tiny_guest.S's readiness line, then its serial port flooded forever.
 *
 * Entered like tiny_guest.S (64-bit long mode at e_entry, interrupts off). We:
 *   1. write "banger-guest: ready boot_id=<16 hex digits of rdtsc>\n" to COM1 (0x3f8), one `out`
 *      per byte, so banger sees the VM ready;
 *   2. then, as fast as the UART takes it, write `flood` (one line) over and over to COM1, and
 *      between lines look once at the i8042 status port (0x64): when Firecracker's SendCtrlAltDel
 *      puts a scancode there, ask the i8042 to reset the CPU (0xfe to 0x64), so `banger vm stop`
 *      still stops this guest the way it stops tiny_guest.S;
 *   3. after that request, `hlt` forever.
 * The flood line is also the marker by which the stand-in VMM (which runs no guest code) knows to
 * produce the same flood itself (standin/src/serial.rs FLOOD_LINE): keep the two identical.
 */
        .code64
        .text
        .globl _start
_start:
        rdtsc
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

        mov     $16, %ecx
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

4:      mov     $0x3f8, %dx             /* one flood line */
        lea     flood(%rip), %rsi
        mov     $flood_len, %ecx
5:      mov     (%rsi), %al
        out     %al, %dx
        inc     %rsi
        dec     %ecx
        jnz     5b
        in      $0x64, %al              /* i8042 status: bit 0 = output buffer full */
        test    $1, %al
        jz      4b
        in      $0x60, %al
        mov     $0xfe, %al
        out     %al, $0x64

6:      hlt
        jmp     6b

prefix: .ascii  "banger-guest: ready boot_id="
        .set    prefix_len, . - prefix
flood:  .ascii  "banger-guest: flood 0123456789abcdefghijklmnopqrstuvwxyz\n"
        .set    flood_len, . - flood

        .section .note.GNU-stack, "", @progbits
