"""``diffrl bench``: measurements that print ratios taken side by side in one run (not timed tests)."""
