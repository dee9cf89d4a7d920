"""Source texts of user metric modules the cluster tests drop on a job's PVC (`data.evaluation.metric`)."""

TOP1 = '''

class Top1:
    higher_is_better = True

    def __init__(self):
        self.reset()

    def reset(self):
        self.correct, self.total = 0, 0

    def update(self, preds, labels):
        self.correct += int((np.asarray(preds).argmax(axis=-1) == np.asarray(labels)).sum())
        self.total += len(labels)

    def result(self):
        return self.correct / self.total if self.total else 0.0
'''
"""A top-1 accuracy metric class (the module must import numpy as np)."""

HOG = '''"""A metric module that, in trial pods only, allocates far past the pod's memory limit."""
import os

import numpy as np

if os.environ.get("QTUNE_UNIT", "").startswith("trial-"):
    _ballast = np.ones(2**28)  # 2 GiB, every page touched
''' + TOP1


def stalling(pod_name: str, seconds: int = 300) -> str:
    """A metric module that, in the pod named `pod_name` only, stalls at import for `seconds`: a test
    deleting that pod then certainly catches it mid-run (a digits trial may otherwise finish first)."""
    return f'''"""A metric module that stalls in pod {pod_name} only."""
import os
import time

import numpy as np

if os.environ.get("QTUNE_POD_NAME") == {pod_name!r}:
    time.sleep({seconds})
''' + TOP1
