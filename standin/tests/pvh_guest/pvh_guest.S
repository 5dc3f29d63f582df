/*
 * The stand-in TCG engine's tiny PVH guest: the smallest "kernel" QEMU's microvm enters through
 * a PVH entry note, as it enters a Linux vmlinux. Lets the engine's tests (QEMU command line, QMP,
 * Ctrl+Alt+Del, exit, death with the stand-in) run in a second where no Linux kernel was built.
 *
 * PVH enters at the note's address in 32-bit protected mode, paging off. We:
 *   1. write "pvh-guest: hello\n" to COM1 (0x3f8), one `out` per byte;
 *   2. poll the i8042 status port (0x64) until a scancode arrives (the stand-in's SendCtrlAltDel
 *      is QMP `send-key ctrl-alt-delete` on the i8042 keyboard), then pulse the CPU reset line
 *      (0xfe to 0x64): QEMU runs with -no-reboot, so it exits 0, as a Linux guest's reboot makes it;
 *   3. `hlt` forever.
 */
        .code32
        .text
        .globl _start
_start:
        mov     $0x3f8, %dx
        lea     msg, %esi
        mov     $msg_len, %ecx
1:      mov     (%esi), %al
        out     %al, %dx
        inc     %esi
        dec     %ecx
        jnz     1b

2:      mov     $0x40000, %ecx          /* spin a little between polls */
3:      pause
        dec     %ecx
        jnz     3b
        in      $0x64, %al              /* i8042 status: bit 0 = output buffer full */
        test    $1, %al
        jz      2b
        in      $0x60, %al              /* take the scancode */
        mov     $0xfe, %al              /* pulse the CPU reset line */
        out     %al, $0x64

4:      hlt
        jmp     4b

msg:    .ascii  "pvh-guest: hello\n"
        .set    msg_len, . - msg

/* XEN_ELFNOTE_PHYS32_ENTRY (type 18, owner "Xen"): the 32-bit entry point. */
        .section .note.Xen, "a"
        .align  4
        .long   4                       /* namesz */
        .long   4                       /* descsz */
        .long   18                      /* type */
        .asciz  "Xen"
        .long   _start
