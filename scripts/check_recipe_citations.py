"""Check the recipe tables' citations against the pinned official sources (not run in CI: it needs them).

Every row of ``msconv.engine.recipes.OFFICIAL_RECIPES`` (the ImageNet recipes and the dense ones that
``msconv.engine.dense_recipes`` registers) cites ``file:line`` or ``file:a-b`` (several separated by commas, each
with an optional note). This script reads each cited line at the pinned commit of the recipe's repository (``git
show COMMIT:path`` in a bare mirror) or, for ``mmdet:`` / ``mmseg:`` / ``mmcv:`` citations, in the reference
environment's wheels (mmdetection 2.28.2, mmsegmentation 0.30.0, mmcv 1.7.2: their ``.mim/configs/_base_`` and
``runner/`` files), and checks that the row's official value is there:

* numbers (and each item of a tuple or list) among the numbers on the cited lines, compared as floats; a product
  written in the notes, ``(8 x 128)`` or ``(128 per GPU) ... (8 GPUs)``, passes when its factors are there and
  multiply to the value; a number not there is a difference, unless the cited lines hold no number at all
  (``CROP: False`` for a crop fraction of 1): then it is shown for reading ("by eye");
* strings as case-insensitive substrings, True / False / None literally; otherwise they are shown for reading
  (e.g. ``float16`` for ``AMP_ENABLE = True``), as are rows that cite no line.

It prints one line per row (``ok``, ``by eye``, ``no line`` or ``DIFFERS`` with the cited text) and the
``based_on`` citations whose lines do not exist, and exits 1 when a value differs or a cited line is missing:

    PYTHONPATH=src python scripts/check_recipe_citations.py [--mirrors /work/.mirror] \\
        [--site-packages /work/envs/mmref/lib/python3.11/site-packages] [--all]
"""

from __future__ import annotations

import argparse
import math
import re
import subprocess
import sys
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator, List, Optional, Tuple

WHEELS = {
    'mmdet': ('mmdet/.mim/configs', '2.28.2'),
    'mmseg': ('mmseg/.mim/configs', '0.30.0'),
    'mmcv': ('mmcv', '1.7.2'),
}
CITATION = re.compile(r'(?:(mmdet|mmseg|mmcv):)?([\w./{},+-]*\w\.(?:py|md|yaml|sh|txt)):(\d+)(?:-(\d+))?')
NUMBER = re.compile(r'(?<![\w.])[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?')
PRODUCT = re.compile(r'(\d+)[^\d(),;]*? x [^\d(),;]*?(\d+)(?:[^\d(),;]*? x [^\d(),;]*?(\d+))?')
NOTE = re.compile(r'\(([^()]*)\)')


class Sources:
    def __init__(self, mirrors: Path, site_packages: Path):
        self.mirrors, self.site = mirrors, site_packages

    @lru_cache(maxsize=None)
    def lines(self, repo: str, prefix: Optional[str], path: str) -> Optional[List[str]]:
        """The file's lines (None: not found)."""
        if prefix is not None:
            folder, _ = WHEELS[prefix]
            p = self.site / folder / path
            return p.read_text().splitlines() if p.is_file() else None
        name, _, commit = repo.partition('@')
        git = self.mirrors / name.replace('/', '+') / 'repo'
        res = subprocess.run(['git', '-C', str(git), 'show', f'{commit}:{path}'], capture_output=True, text=True)
        return res.stdout.splitlines() if res.returncode == 0 else None

    def versions(self) -> List[str]:
        """Problems with the wheels' versions (they must be the pinned ones)."""
        out = []
        for name, (_, want) in WHEELS.items():
            init = self.site / name / 'version.py'
            text = init.read_text() if init.is_file() else ''
            if f"'{want}'" not in text and f'"{want}"' not in text:
                out.append(f"{name} at {self.site} is not {want}")
        return out


def citations(src: str) -> Iterator[Tuple[Optional[str], str, int, int]]:
    for m in CITATION.finditer(src):
        first = int(m.group(3))
        yield m.group(1), m.group(2), first, int(m.group(4) or first)


def _numbers(text: str) -> List[float]:
    return [float(x) for x in NUMBER.findall(text)]


def _has_number(value: float, numbers: List[float]) -> bool:
    return any(math.isclose(value, n, rel_tol=1e-9, abs_tol=0.0) for n in numbers)


def _number_found(value: float, texts: List[str], src: str) -> Optional[bool]:
    """The number itself on the cited lines, or a product of the notes' numbers; and every citation whose lines
    hold numbers holds it or one of the product's factors (so that a wrong line beside a right one is caught)."""
    numbers = [_numbers(t) for t in texts]
    every = [n for ns in numbers for n in ns]
    notes = NOTE.findall(src)
    candidates = [[value]]
    candidates += [[int(f) for f in m.groups() if f] for note in notes for m in PRODUCT.finditer(note)]
    candidates.append([int(x) for note in notes for x in re.findall(r'(?<![\w.:-])\d+(?![\w.])', note)])
    for factors in candidates:
        if len(factors) > 1 and math.prod(factors) != value:
            continue
        each = all(not ns or any(_has_number(f, ns) for f in factors) for ns in numbers)
        if each and all(_has_number(f, every) for f in factors):
            return True
    return None if not every else False


def value_found(value: Any, texts: List[str], src: str) -> Optional[bool]:
    """True / False, or None when the value cannot be found literally (read it); ``texts``: the lines of each
    citation."""
    text = '\n'.join(texts)
    if isinstance(value, bool) or value is None:
        return True if str(value) in text else None
    if isinstance(value, (int, float)):
        return _number_found(float(value), texts, src)
    if isinstance(value, str):
        return True if value.lower() in text.lower() else None
    if isinstance(value, (tuple, list)):
        if not value:
            return None
        found = [value_found(v, [text], '') for v in value]
        return None if None in found else all(found)
    return None


def check(sources: Sources, show_all: bool) -> int:
    import msconv.engine  # noqa: F401  (loads the tasks: the dense recipes register themselves)
    from msconv.engine.recipes import OFFICIAL_RECIPES, UNOFFICIAL_PRESETS

    problems = sources.versions()
    counts = {'ok': 0, 'by eye': 0, 'no line': 0, 'DIFFERS': 0}
    recipes = [(key, rec['repo'], rec) for key, rec in OFFICIAL_RECIPES.items()]
    for key, repo, rec in recipes:
        print(f"== {key} ({repo})")
        for prefix, path, a, b in citations(rec['based_on']):
            lines = sources.lines(repo, prefix, path)
            if lines is None or b > len(lines):
                problems.append(f"{key}: based_on cites {path}:{a}-{b}, which does not exist")
        for row in rec['rows']:
            cited = list(citations(row['src']))
            texts, missing = [], []
            for prefix, path, a, b in cited:
                lines = sources.lines(repo, prefix, path)
                if lines is None or b > len(lines):
                    missing.append(f"{(prefix + ':') if prefix else ''}{path}:{a}-{b}")
                else:
                    texts.append('\n'.join(lines[a - 1 : b]))
            text = '\n'.join(texts).splitlines()
            if missing:
                status = 'DIFFERS'
                problems.append(f"{key} / {row['param']}: cited line(s) missing: {', '.join(missing)}")
            elif not cited:
                status = 'no line'
            else:
                found = value_found(row['official'], texts, row['src'])
                status = 'ok' if found else ('by eye' if found is None else 'DIFFERS')
                if found is False:
                    problems.append(f"{key} / {row['param']}: {row['official']!r} not at {row['src']}")
            counts[status] += 1
            if status != 'ok' or show_all:
                print(f"  [{status}] {row['param']} = {row['official']!r} at {row['src']}")
                for line in text if status != 'no line' else []:
                    print(f"      | {line.strip()[:150]}")
    print(f"== presets with no official recipe: {len(UNOFFICIAL_PRESETS)} (their rows cite no official value)")
    print('rows: ' + ', '.join(f"{k} {v}" for k, v in counts.items()))
    for p in problems:
        print(f"PROBLEM: {p}")
    return 1 if problems else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--mirrors', type=Path, default=Path('/work/.mirror'), help='bare mirrors: <owner>+<name>/repo')
    parser.add_argument(
        '--site-packages',
        type=Path,
        default=Path('/work/envs/mmref/lib/python3.11/site-packages'),
        help="the reference environment's site-packages (mmdet, mmseg, mmcv wheels)",
    )
    parser.add_argument('--all', action='store_true', help='print every row, not only those to read')
    args = parser.parse_args(argv)
    return check(Sources(args.mirrors, args.site_packages), args.all)


if __name__ == '__main__':
    sys.exit(main())
