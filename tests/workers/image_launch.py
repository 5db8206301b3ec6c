"""Run ``peftlab.cli`` under ``accelerate launch`` for tests/test_image_multiprocess.py.

After training, each process writes its trainable tensors to ``$PEFTLAB_TEST_DUMP/rank<k>.safetensors`` so the
test can compare the processes; with ``$PEFTLAB_TEST_KILL_AFTER=<step>`` every process kills itself (SIGKILL, as
a crash would) once the checkpoint of that step is complete.
"""

import os
import signal
import sys

from safetensors.torch import save_file

from peftlab.cli import main
from peftlab.recipes.image import training as it

fit, save_checkpoint = it.fit, it.save_checkpoint


def dumping_fit(pipe, modules, *args, **kwargs):
    result = fit(pipe, modules, *args, **kwargs)
    tensors = {k: p.detach().contiguous() for k, p in it.named_trainable(modules).items()}
    save_file(tensors, os.path.join(os.environ["PEFTLAB_TEST_DUMP"], f"rank{os.environ['RANK']}.safetensors"))
    return result


def killing_save(out, step, accelerator, *rest, **kwargs):
    folder = save_checkpoint(out, step, accelerator, *rest, **kwargs)
    if step == int(os.environ.get("PEFTLAB_TEST_KILL_AFTER", "0")):
        accelerator.wait_for_everyone()  # the main process has written trainer_state.json
        os.kill(os.getpid(), signal.SIGKILL)
    return folder


it.fit, it.save_checkpoint = dumping_fit, killing_save
sys.exit(main(sys.argv[1:]))
