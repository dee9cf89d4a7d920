"""The operator process never imports a framework: its image and memory stay small."""

import subprocess
import sys


def test_operator_imports_no_framework():
    code = (
        "import sys, qtune.operator.main, qtune.operator.handlers, qtune.cli.main\n"
        "heavy = [m for m in ('onnxruntime', 'onnx', 'torch', 'numpy') if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "", f"the operator imported {result.stdout.strip()}"
