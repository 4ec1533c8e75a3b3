from configparser import ConfigParser
from packaging.version import Version
import setuptools, shlex

# All project metadata lives in settings.ini (nbdev's single source of truth).
config = ConfigParser(delimiters=['='])
config.read('settings.ini', encoding='utf-8')
cfg = config['DEFAULT']
for key in 'version description keywords author author_email license min_python git_url lib_name'.split():
    assert key in cfg, f"settings.ini is missing '{key}'"

licenses = {'apache2': 'Apache-2.0'}   # SPDX expression (license classifiers are deprecated)
statuses = ['1 - Planning', '2 - Pre-Alpha', '3 - Alpha', '4 - Beta', '5 - Production/Stable']
py_versions = '3.9 3.10 3.11 3.12 3.13'.split()
min_python = cfg['min_python']
lic = licenses[cfg['license']]

def reqs(key): return shlex.split(cfg.get(key, ''))

setuptools.setup(
    name=cfg['lib_name'].replace('_', '-'),
    version=cfg['version'],
    license=lic,
    classifiers=['Development Status :: ' + statuses[int(cfg['status'])],
                 'Intended Audience :: ' + cfg['audience'].title(),
                 'Natural Language :: ' + cfg['language'].title()]
                + ['Programming Language :: Python :: ' + v for v in py_versions
                   if Version(v) >= Version(min_python)],
    url=cfg['git_url'],
    # the workshop notebooks (nbs/tutorials) ship inside the package as data, for `sadm-lab workshop DIR`
    packages=setuptools.find_packages(include=[cfg['lib_name'], cfg['lib_name'] + '.*']) + [cfg['lib_name'] + '.tutorials'],
    package_dir={cfg['lib_name'] + '.tutorials': 'nbs/tutorials'},
    # ... and the shipped FID feature networks (sadm_lab.metrics.SHIPPED_FEATURE_NETS)
    package_data={cfg['lib_name'] + '.tutorials': ['*.ipynb'], cfg['lib_name']: ['feature_nets/*.safetensors']},
    include_package_data=True,
    install_requires=reqs('requirements'),
    extras_require={'lab': reqs('lab_requirements'), 'emoji': reqs('emoji_requirements'),
                    'track': reqs('track_requirements'), 'dev': reqs('dev_requirements')},
    python_requires='>=' + min_python,
    long_description=open('README.md', encoding='utf-8').read(),
    long_description_content_type='text/markdown',
    zip_safe=False,
    entry_points={'console_scripts': cfg['console_scripts'].split(), 'nbdev': [f"{cfg['lib_path']}={cfg['lib_path']}._modidx:d"]},
    description=cfg['description'],
    keywords=cfg['keywords'],
    author=cfg['author'],
    author_email=cfg['author_email'],
)
