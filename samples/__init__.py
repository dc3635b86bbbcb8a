"""Sample devices, each runnable with `python -m muser.run NAME`, and `status_http`,
which embeds one in an asyncio service (installed as muser_samples)."""
