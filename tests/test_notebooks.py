"""Every notebook opens in JupyterLab without a kernel dialog: a `python3` kernelspec in its metadata that
`nbdev_clean` keeps, and the kernel exists where `make install` put it."""
import json, subprocess, sys
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parent.parent
NBS = sorted((ROOT/'nbs').glob('*.ipynb'))

@pytest.mark.parametrize('nb', NBS, ids=[p.name for p in NBS])
def test_kernelspec_python3(nb):
    "The notebook names the python3 kernel, as JupyterLab needs to open it straight away"
    ks = json.loads(nb.read_text())['metadata'].get('kernelspec', {})
    assert ks.get('name') == 'python3' and ks.get('language') == 'python', f"{nb.name}: kernelspec {ks}"

def test_python3_kernel_installed():
    "The python3 kernel the notebooks name is installed for this interpreter"
    cmd = [sys.executable, '-m', 'jupyter', 'kernelspec', 'list', '--json']
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert 'python3' in json.loads(r.stdout)['kernelspecs']
