"""The front process (``moed serve``): sockets, sessions, admission and engine supervision. It never imports MLX."""
