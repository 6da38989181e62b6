"""QEMU: command line, accelerator probe, process and QMP control."""
