"""submitit job callables and executor set-up for the fcmae library."""
