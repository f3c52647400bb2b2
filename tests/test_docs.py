"""The README and docs/ stay true to the tree: every relative link reaches a file (and, with an
`#anchor`, a heading that GitHub would give that anchor), the README stays short and keeps the
test command `.ci/run` reads, and every `fused-resnet CMD` it names is a command that runs."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
README_MAX_LINES = 150

FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.M | re.S)
INLINE_CODE = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"!?\[[^\]\n]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
HEADING = re.compile(r"^#{1,6}[ \t]+(.+?)[ \t]*#*[ \t]*$", re.M)
EXTERNAL = re.compile(r"^[a-z][a-z0-9+.-]*:", re.I)  # http:, https:, mailto:, ...


def _without_code_blocks(text: str) -> str:
    return FENCE.sub("", text)


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a heading: its rendered text lowercased, every character that is
    not a letter, digit, space, '-' or '_' dropped, spaces turned into '-'."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link renders as its text
    text = re.sub(r"[^\w\- ]", "", text.lower())
    return text.replace(" ", "-")


def anchors(page: Path) -> set:
    """Every heading's anchor, with GitHub's -1, -2, ... suffixes for repeated headings."""
    seen, result = {}, set()
    for heading in HEADING.findall(_without_code_blocks(page.read_text())):
        anchor = github_anchor(heading)
        count = seen.get(anchor, 0)
        seen[anchor] = count + 1
        result.add(anchor if count == 0 else f"{anchor}-{count}")
    return result


def links(page: Path) -> list:
    """The targets of the page's markdown links and images, outside code."""
    text = INLINE_CODE.sub("", _without_code_blocks(page.read_text()))
    return LINK.findall(text)


def broken_links(page: Path) -> list:
    """Each relative link of `page` whose file, or whose heading, does not exist."""
    problems = []
    for target in links(page):
        if EXTERNAL.match(target):
            continue
        path_part, _, anchor = target.partition("#")
        linked = (page.parent / path_part).resolve() if path_part else page
        if not linked.exists():
            problems.append(f"{page.name}: {target}: no file {linked}")
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
            problems.append(f"{page.name}: {target}: no heading with anchor #{anchor} in "
                            f"{linked.name}")
    return problems


def test_github_anchor_rules():
    assert github_anchor("What `fuse_` covers") == "what-fuse_-covers"
    assert github_anchor("Quick start (fresh machine: Linux, Python 3.11, pip)") == \
        "quick-start-fresh-machine-linux-python-311-pip"
    assert github_anchor("Measured on a 2-core CPU, and the targets") == \
        "measured-on-a-2-core-cpu-and-the-targets"


def test_checker_finds_a_missing_file_and_a_missing_heading(tmp_path):
    (tmp_path / "other.md").write_text("# Real heading\n\n```\n# not a heading\n```\n")
    page = tmp_path / "page.md"
    page.write_text("[ok](other.md#real-heading) [gone](missing.md) [bad](other.md#not-a-heading)"
                    " [web](https://example.com/x.md) `[code](nowhere.md)` [self](#top)\n# Top\n")
    problems = broken_links(page)
    assert len(problems) == 2, problems
    assert "missing.md" in problems[0] and "#not-a-heading" in problems[1]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_relative_link_resolves(page):
    assert links(page) or page != README, "README.md links to nothing: the parser is broken"
    assert broken_links(page) == []


def test_readme_is_short_and_keeps_the_test_command():
    text = README.read_text()
    assert len(text.splitlines()) < README_MAX_LINES
    # The block .ci/run extracts and runs (same pattern as .ci/run).
    block = re.search(r"<!-- test-command -->\s*```(?:bash|sh)\n(.*?)```", text, re.S)
    assert block, "README.md lost the shell block after <!-- test-command --> that .ci/run runs"
    assert "pytest" in block.group(1)


# One subprocess for all commands (importing torch costs seconds): each runs exactly as
# `python -m MODULE ARGS` would, through runpy, and its exit status is recorded.
HELP_RUNNER = """
import json, runpy, sys
codes = {}
for module, args in json.loads(sys.argv[1]):
    sys.argv = [module, *args]
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
        codes[" ".join([module, *args])] = 0
    except SystemExit as exit:
        codes[" ".join([module, *args])] = exit.code or 0
print("CODES " + json.dumps(codes))
"""


def readme_commands() -> list:
    """(module, args) for every `fused-resnet CMD` and `python -m fused_resnet.X` README names."""
    text = README.read_text()
    commands = sorted(set(re.findall(r"\bfused-resnet ([a-z][a-z0-9_-]*)", text)))
    modules = sorted(set(re.findall(r"python -m (fused_resnet\.[a-z_.]+)", text)))
    return ([("fused_resnet", [cmd, "--help"]) for cmd in commands]
            + [(module, ["--help"]) for module in modules])


def test_every_command_the_readme_names_exists(tmp_path):
    wanted = readme_commands()
    assert ("fused_resnet", ["bench", "--help"]) in wanted, wanted
    # Outside the repository root: from there `import fused_resnet` finds the unbuilt tree.
    run = subprocess.run([sys.executable, "-c", HELP_RUNNER, json.dumps(wanted)], cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    lines = [line for line in run.stdout.splitlines() if line.startswith("CODES ")]
    assert lines, run.stdout[-2000:] + run.stderr[-2000:]
    codes = json.loads(lines[-1][len("CODES "):])
    failed = {command: code for command, code in codes.items() if code != 0}
    assert not failed, f"README names commands whose --help fails: {failed}\n{run.stderr[-2000:]}"
    assert len(codes) == len(wanted)
