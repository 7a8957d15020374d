"""A package plugs a source, a profile and a command into vesl through entry points, as the demo world does.

The throwaway plugin is a real distribution (a ``.dist-info`` with ``entry_points.txt``) on ``PYTHONPATH``, so
``importlib.metadata`` finds it exactly as it finds one that pip installed; `vesl` runs as a subprocess.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pyarrow.parquet as pq
import pytest

PLUGIN = '''
"""A user's vesl plugin: inputs hello://N, the profile `hello`, the command `vesl hello`."""

import io

import typer
from PIL import Image

from vesl.pipeline.sources import SourceScheme
from vesl.schemas.stage import Sample


def _png(i):
    buf = io.BytesIO()
    Image.new("RGB", (32, 24), (40 * i % 256, 90, 200)).save(buf, format="PNG")
    return buf.getvalue()


def _read(uri, source):
    n = int(uri.removeprefix("hello://"))
    for i in range(n):
        yield Sample(key=f"hello-{i}", source_shard=source, index=i, image_bytes=_png(i), alt_text=f"a blue square {i}")


SOURCE = SourceScheme(kind="hello", expand=lambda uri: [uri], read=_read, count=lambda uri: int(uri[8:]))
PROFILE = {"captioner": {"spec": "alt_text"}, "phrases": {"mode": "paper"}, "detector": {"spec": "none"}}


def register(app):
    @app.command("hello")
    def hello(name: str = typer.Option("world", "--name")) -> None:
        """Say hello (a plugin's command)."""
        typer.echo(f"hello {name}")
'''

ENTRY_POINTS = """
[vesl.sources]
hello = vplug:SOURCE

[vesl.profiles]
hello = vplug:PROFILE
broken = vplug_missing:PROFILE

[vesl.commands]
hello = vplug:register
broken = vplug_missing:register
"""


@pytest.fixture(scope="module")
def plugin_path(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("plugin")
    (root / "vplug.py").write_text(textwrap.dedent(PLUGIN))
    info = root / "vplug-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: vplug\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(ENTRY_POINTS)
    return root


def vesl(plugin_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(plugin_path), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-c", "from vesl.cli import main; main()", *args], capture_output=True,
                          text=True, env=env, timeout=300, check=False)


def test_a_plugin_adds_a_command_and_a_broken_one_costs_only_its_own(plugin_path):
    r = vesl(plugin_path, "--help")
    assert r.returncode == 0, r.stderr
    assert r.stderr.splitlines() == ["warning: vesl plugin 'broken' (vplug_missing:register) failed to load, its "
                                     "commands are missing: ModuleNotFoundError: No module named 'vplug_missing'"]
    assert "hello" in r.stdout.split("Commands:")[1]
    assert "demo" in r.stdout  # the demo world's commands come the same way, from vesl's own entry points
    r = vesl(plugin_path, "hello", "--name", "vesl")
    assert (r.returncode, r.stdout.strip()) == (0, "hello vesl"), r.stderr


def test_a_plugin_source_and_profile_label_a_dataset(plugin_path, tmp_path):
    r = vesl(plugin_path, "label", "--help")
    assert "hello" in r.stdout  # --profile lists the installed profiles
    assert "demo" in r.stdout
    out = tmp_path / "out"
    r = vesl(plugin_path, "label", "hello://5", "--output", str(out), "--profile", "hello", "--no-progress")
    assert r.returncode == 0, r.stderr
    rows = pq.read_table(out / "part-00000.parquet").to_pylist()
    assert [row["key"] for row in rows] == [f"hello-{i}" for i in range(5)]
    assert rows[3]["caption"] == "a blue square 3"  # the plugin profile's captioner: alt_text
    assert all(row["regions"] == [] for row in rows)  # its detector: none
    stats = json.loads((out / "part-00000.stats.json").read_text())
    assert "hello://5" in json.dumps(stats)


def test_a_broken_or_unknown_plugin_is_one_line(plugin_path, tmp_path):
    r = vesl(plugin_path, "label", "hello://2", "--output", str(tmp_path / "o"), "--profile", "broken")
    assert r.returncode == 2
    [line] = [x for x in r.stderr.splitlines() if not x.startswith("warning: vesl plugin 'broken'")]
    assert line.startswith("error: profile 'broken' (vplug_missing:PROFILE) failed to load: ModuleNotFoundError")
    r = vesl(plugin_path, "label", "hello://2", "--output", str(tmp_path / "o"), "--profile", "nope")
    assert r.returncode == 2
    assert "unknown profile 'nope': use one of" in r.stderr
    assert "hello" in r.stderr


def test_without_the_plugin_its_input_is_not_read(tmp_path):
    """The same input with no plugin installed: one line naming the inputs vesl can read, no traceback."""
    r = vesl(tmp_path, "label", "hello://2", "--output", str(tmp_path / "o"), "--profile", "default")
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    assert "synth://N" in r.stderr  # the schemes that are installed (vesl's own demo world)
