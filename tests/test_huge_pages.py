"""cli/huge_pages.py: when an entry point re-executes itself with glibc's huge-page tunable, and
that it does so once, keeping its arguments, output and other tunables."""

import os
import subprocess
import sys

from latent_diffusion_jax.cli import huge_pages

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _linux_with_thp(monkeypatch, tmp_path, mode="always [madvise] never"):
  thp = tmp_path / "enabled"
  thp.write_text(mode + "\n")
  monkeypatch.setattr(huge_pages, "_THP", str(thp))
  monkeypatch.setattr(huge_pages.sys, "platform", "linux")
  monkeypatch.setattr(huge_pages.platform, "libc_ver", lambda: ("glibc", "2.36"))


def test_tunable_added_kept_or_skipped(monkeypatch, tmp_path):
  _linux_with_thp(monkeypatch, tmp_path)
  env = huge_pages.environment_with_huge_pages({"PATH": "/bin"})
  assert env == {"PATH": "/bin", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
  # Other tunables stay; one already set (either value) or an opt-out leaves the env alone.
  env = huge_pages.environment_with_huge_pages({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})
  assert env["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"
  assert huge_pages.environment_with_huge_pages({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}) is None
  assert huge_pages.environment_with_huge_pages({huge_pages.OPT_OUT: "0"}) is None


def test_skipped_where_it_cannot_help(monkeypatch, tmp_path):
  _linux_with_thp(monkeypatch, tmp_path, "always madvise [never]")
  assert huge_pages.environment_with_huge_pages({}) is None
  _linux_with_thp(monkeypatch, tmp_path)
  monkeypatch.setattr(huge_pages.platform, "libc_ver", lambda: ("glibc", "2.31"))
  assert huge_pages.environment_with_huge_pages({}) is None
  monkeypatch.setattr(huge_pages.platform, "libc_ver", lambda: ("", ""))  # musl, macOS
  assert huge_pages.environment_with_huge_pages({}) is None
  _linux_with_thp(monkeypatch, tmp_path)
  monkeypatch.setattr(huge_pages.sys, "platform", "darwin")
  assert huge_pages.environment_with_huge_pages({}) is None


_SCRIPT = """
import os, sys
print("start", flush=True)
from latent_diffusion_jax.cli import huge_pages
if __name__ == "__main__":
  huge_pages.reexec_with_huge_pages()
print("args", sys.argv[1:], "tunables", os.environ.get("GLIBC_TUNABLES"))
"""


def test_entry_point_reexecutes_once_with_its_arguments(tmp_path):
  script = tmp_path / "entry.py"
  script.write_text(_SCRIPT)
  env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", huge_pages.OPT_OUT)}
  env["PYTHONPATH"] = REPO
  proc = subprocess.run([sys.executable, str(script), "--flag", "a b"], capture_output=True,
                        text=True, timeout=120, env=env, check=True)
  applies = huge_pages.environment_with_huge_pages(env) is not None
  # Printed once before the re-execution and once after it; the arguments survive.
  assert proc.stdout.count("start") == (2 if applies else 1), proc.stdout
  want = "glibc.malloc.hugetlb=1" if applies else "None"
  assert proc.stdout.strip().endswith(f"args ['--flag', 'a b'] tunables {want}"), proc.stdout
  env[huge_pages.OPT_OUT] = "0"
  proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                        timeout=120, env=env, check=True)
  assert proc.stdout.count("start") == 1 and proc.stdout.strip().endswith("tunables None")
