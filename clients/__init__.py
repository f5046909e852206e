"""Real-device client runners: a local fleet of Flower SuperNodes (``fleet.py``); phone bridges (docs/devices.md)."""
