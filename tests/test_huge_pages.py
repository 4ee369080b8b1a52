"""cli/huge_pages.py: an entry point re-executes itself with glibc's huge-page tunable only when
opted into (LATENT_DIFFUSION_HUGE_PAGES=1), and then once, keeping its arguments, output and other
tunables."""

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


ON = {huge_pages.OPT_IN: "1"}


def test_off_unless_opted_into(monkeypatch, tmp_path):
  _linux_with_thp(monkeypatch, tmp_path)
  for env in ({}, {"PATH": "/bin"}, {huge_pages.OPT_IN: "0"}, {huge_pages.OPT_IN: "yes"}):
    assert huge_pages.environment_with_huge_pages(env) is None, env


def test_tunable_added_kept_or_skipped(monkeypatch, tmp_path):
  _linux_with_thp(monkeypatch, tmp_path)
  env = huge_pages.environment_with_huge_pages({"PATH": "/bin", **ON})
  assert env == {"PATH": "/bin", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1", **ON}
  # Other tunables stay; one already set (either value) leaves the env alone.
  env = huge_pages.environment_with_huge_pages({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2", **ON})
  assert env["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"
  assert huge_pages.environment_with_huge_pages(
      {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0", **ON}) is None


def test_skipped_where_it_cannot_help(monkeypatch, tmp_path):
  _linux_with_thp(monkeypatch, tmp_path, "always madvise [never]")
  assert huge_pages.environment_with_huge_pages(dict(ON)) is None
  _linux_with_thp(monkeypatch, tmp_path)
  monkeypatch.setattr(huge_pages.platform, "libc_ver", lambda: ("glibc", "2.31"))
  assert huge_pages.environment_with_huge_pages(dict(ON)) is None
  monkeypatch.setattr(huge_pages.platform, "libc_ver", lambda: ("", ""))  # musl, macOS
  assert huge_pages.environment_with_huge_pages(dict(ON)) is None
  _linux_with_thp(monkeypatch, tmp_path)
  monkeypatch.setattr(huge_pages.sys, "platform", "darwin")
  assert huge_pages.environment_with_huge_pages(dict(ON)) is None


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
  env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", huge_pages.OPT_IN)}
  env["PYTHONPATH"] = REPO
  # Not opted into: runs once, as it is.
  proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                        timeout=120, env=env, check=True)
  assert proc.stdout.count("start") == 1 and proc.stdout.strip().endswith("tunables None")
  env[huge_pages.OPT_IN] = "1"
  proc = subprocess.run([sys.executable, str(script), "--flag", "a b"], capture_output=True,
                        text=True, timeout=120, env=env, check=True)
  applies = huge_pages.environment_with_huge_pages(env) is not None
  # Printed once before the re-execution and once after it; the arguments survive.
  assert proc.stdout.count("start") == (2 if applies else 1), proc.stdout
  want = "glibc.malloc.hugetlb=1" if applies else "None"
  assert proc.stdout.strip().endswith(f"args ['--flag', 'a b'] tunables {want}"), proc.stdout
