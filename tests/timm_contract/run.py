"""Run timm's own ``tests/test_models.py`` against msconv's models (see ``conftest.py`` beside this file).

    python tests/timm_contract/run.py [--models micro|full|NAME,NAME] [pytest args...]

The test file comes from the source distribution of the *installed* timm version on the package registry
(``pip download --no-binary :all: timm==VERSION``), cached under ``.cache/timm-tests/VERSION``; it is never
committed. If it cannot be fetched the run fails with a message saying so (it never passes silently).
"""

import argparse
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


def fetch_test_file(version: str) -> Path:
    cache = REPO / '.cache' / 'timm-tests' / version
    target = cache / 'test_models.py'
    if target.is_file():
        return target
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [
            sys.executable,
            '-m',
            'pip',
            'download',
            '--quiet',
            '--no-deps',
            '--no-binary',
            ':all:',
            f'timm=={version}',
            '-d',
            tmp,
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        sdists = list(Path(tmp).glob('timm-*.tar.gz'))
        if proc.returncode != 0 or not sdists:
            sys.exit(
                f"timm-tests: could not fetch the source distribution of timm {version} from the package "
                f"registry, so timm's test_models.py cannot run (pip said: {proc.stderr.strip()[-500:]})"
            )
        with tarfile.open(sdists[0]) as tar:
            member = tar.getmember(f'timm-{version}/tests/test_models.py')
            data = tar.extractfile(member).read()
    cache.mkdir(parents=True, exist_ok=True)
    tmp_target = target.with_suffix('.tmp')
    tmp_target.write_bytes(data)
    os.replace(tmp_target, target)
    return target


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--models', default='micro', help="'micro' (test_* variants), 'full' or NAME,NAME")
    args, pytest_args = parser.parse_known_args()
    import timm

    source = fetch_test_file(timm.__version__)
    run_dir = REPO / 'build' / 'timm-tests'
    run_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, run_dir / 'test_models.py')
    shutil.copyfile(HERE / 'conftest.py', run_dir / 'conftest.py')
    (run_dir / 'pytest.ini').write_text(
        '[pytest]\nmarkers =\n'
        + ''.join(
            f'    {m}: timm marker\n'
            for m in (
                'base',
                'forward',
                'backward',
                'cfg',
                'cfg_nonstd',
                'torchscript',
                'features',
                'fxforward',
                'fxbackward',
                'timeout',
            )
        )
        + 'filterwarnings =\n    ignore::DeprecationWarning\n    ignore::FutureWarning\n'
    )
    env = dict(os.environ, MSCONV_TIMM_MODELS=args.models)
    print(f"timm {timm.__version__}: tests/test_models.py against msconv models ({args.models})", flush=True)
    cmd = [
        sys.executable,
        '-m',
        'pytest',
        '-c',
        str(run_dir / 'pytest.ini'),
        '--rootdir',
        str(run_dir),
        str(run_dir / 'test_models.py'),
        *pytest_args,
    ]
    return subprocess.run(cmd, env=env, cwd=run_dir).returncode


if __name__ == '__main__':
    sys.exit(main())
