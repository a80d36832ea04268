"""What a package index shows: the metadata pyproject.toml gives the wheel (scripts/check_wheel.sh reads the built
wheel's METADATA too), a README whose links work off the repository (absolute, to the documentation site), one
repository/documentation address everywhere, and a changelog entry for the version being released."""

from __future__ import annotations

import re
import tomllib

import yaml
from conftest import REPO

import msconv


def _project():
    return tomllib.loads((REPO / 'pyproject.toml').read_text())['project']


def test_metadata_has_classifiers_urls_authors_and_keywords():
    project = _project()
    assert project['authors'] and len(project['keywords']) >= 5
    assert 'Typing :: Typed' in project['classifiers']
    assert not any(c.startswith('License ::') for c in project['classifiers'])  # PEP 639: the licence expression
    assert set(project['urls']) >= {'Homepage', 'Documentation', 'Repository', 'Issues', 'Changelog'}
    assert project['version'] == msconv.__version__


def test_one_repository_and_documentation_address():
    urls = _project()['urls']
    config = yaml.safe_load((REPO / 'mkdocs.yml').read_text())
    assert config['repo_url'] == urls['Repository'] and config['site_url'] == urls['Documentation']
    assert urls['Changelog'].startswith(urls['Documentation']) and urls['Issues'].startswith(urls['Repository'])


def test_readme_links_work_on_a_package_index():
    readme = (REPO / 'README.md').read_text()
    docs = _project()['urls']['Documentation']
    links = re.findall(r'\]\(([^)]+)\)', readme)
    relative = [u for u in links if not u.startswith(('https://', 'http://', '#'))]
    assert not relative, f'relative links break on a package index page: {relative}'
    pages = [u[len(docs) :].split('#')[0] for u in links if u.startswith(docs)]
    assert len(pages) > 10
    for page in pages:  # each documentation link names a page of the site (page.html for docs/page.md)
        source = REPO / 'docs' / (page[: -len('.html')] + '.md' if page else 'index.md')
        assert source.is_file(), f'README links to {docs}{page}, but docs/ has no {source.name}'


def test_the_changelog_has_an_entry_for_this_version():
    text = (REPO / 'CHANGELOG.md').read_text()
    assert re.search(rf'^## \[{re.escape(msconv.__version__)}\] - \d{{4}}-\d{{2}}-\d{{2}}$', text, re.M)
    assert text.index('## Unreleased') < text.index(f'## [{msconv.__version__}]')
    assert (REPO / 'docs' / 'changelog.md').read_text().strip() == '--8<-- "CHANGELOG.md"'  # the site shows the file
