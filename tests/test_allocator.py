"""On Linux, importing stylecore makes glibc keep freed memory for reuse (much faster CPU forward passes);
the environment variable turns it off."""

import os
import subprocess
import sys

import pytest

CHECK = "import stylecore.allocator as a, stylecore; print(a._applied)"


def applied_in_new_process(**env) -> str:
    done = subprocess.run([sys.executable, "-c", CHECK], env={**os.environ, **env}, capture_output=True, text=True,
                          check=True)
    return done.stdout.strip()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_importing_stylecore_keeps_freed_memory_for_reuse_unless_turned_off():
    assert applied_in_new_process(STYLIZE_KEEP_FREED_MEMORY="1") == "True"
    assert applied_in_new_process(STYLIZE_KEEP_FREED_MEMORY="0") == "False"
