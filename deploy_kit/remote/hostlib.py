"""What several host programs need, in one place: runs on hosts (Python 3.8+, stdlib only)."""

from __future__ import annotations
