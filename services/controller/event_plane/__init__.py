"""The local event plane (see ``services/controller/local_event_plane.py`` for the map of modules)."""
