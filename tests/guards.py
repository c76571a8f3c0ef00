"""Wall-clock guards for tests: against a real hang only, never a measure of speed.

A test bounds its work (images, tokens, requests); these limits sit far above that work's worst case on a slow,
busy machine (2 cores at load 6 runs the embedded model ~15x slower than idle), so they never fail a correct run.
"""
from __future__ import annotations

HANG_GUARD_S = 3600.0  # a subprocess (CLI, make, training run) that has not finished by then is hung
WAIT_GUARD_S = 600.0  # polling for a condition another process will reach (a file filling up, a server starting)
# A request timeout that must never fire on a healthy local server, however busy the machine: tests that inject a
# server-side hang hold the response far longer than this, so only the injected fault times out.
REQUEST_TIMEOUT_S = 3.0
INJECTED_HANG_S = 120.0
