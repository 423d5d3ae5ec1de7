"""freezeframe: instance-level snapshots of every disk of a running libvirt/QEMU VM."""

__version__ = "0.1.0"
