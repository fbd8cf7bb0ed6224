"""Whether the loaded core is the AddressSanitizer build that .ci/sanitize installs."""

from __future__ import annotations

import pytest

import pyrnn

SANITIZED = "sanitize" in str(pyrnn.backend_info().get("codegen_flags", ""))

# ASan keeps freed memory in quarantine and maps shadow memory of its own: the RSS a test reads
# then says nothing of what pyrnn holds or gives back.
measures_rss = pytest.mark.skipif(SANITIZED, reason="RSS under AddressSanitizer is ASan's")
