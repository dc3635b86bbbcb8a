"""Sample devices, each runnable with `python -m muser.run NAME` (installed as muser_samples)."""
