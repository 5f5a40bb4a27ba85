"""How a stdio server is boxed: the launcher that turns its command into what the daemon spawns.

``launcher`` holds the modes (a systemd sandbox per server, a dedicated account, or none) and
``choose_launcher``; ``chain`` the launch chain they share; ``client`` and ``supervisor`` are the
two ends of the systemd mode (stand-alone scripts, standard library only). What each mode lets a
server reach is documented in docs/operations.rst, "The stdio sandbox".
"""
