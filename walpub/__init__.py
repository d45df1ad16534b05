"""walpub: a crash-consistent volume of immutable objects (object-first atomic
publish + a segmented write-ahead log), its recovery, and the one I/O layer all
of its file-system calls go through, with a crash-simulating twin that builds
the states a power loss could leave."""
