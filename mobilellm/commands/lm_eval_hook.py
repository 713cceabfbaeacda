"""`mobilellm lm-eval-hook`: make `lm_eval --model mobilellm` work in this Python environment."""

from __future__ import annotations

from pathlib import Path

from ..eval.lm_eval_hook import PTH_FILE, default_site_dir, write_pth
from ..eval.lm_eval_tasks import lm_eval_task_name, write_lm_eval_task


def lm_eval_hook(*, remove: bool = False, site_dir: Path | None = None, tasks: list[str] | None = None,
                 task_dir: Path = Path("lm-eval-tasks")) -> None:
    """Install (or remove) the start-up hook that registers the lm-eval model `mobilellm`.

    lm-eval has no plugin mechanism for models; the hook is a one-line .pth file in site-packages that
    registers our adapter lazily when lm_eval's registry is imported. lm-eval's own task configs download
    their data from the HF Hub; --tasks writes BIG-bench multiple-choice tasks as lm-eval tasks on local
    files instead (the same items `mobilellm eval` scores). Then, offline:
    lm_eval --model mobilellm --model_args pretrained=FOLDER --include_path lm-eval-tasks --tasks bigbench_winowhy

    Args:
        remove: delete the hook instead of installing it
        site_dir: site-packages folder to use (default: this Python's, or the user site when read-only)
        tasks: BIG-bench tasks (bigbench_<task>) to write as local lm-eval tasks into TASK_DIR
        task_dir: folder for those tasks' configs and data (lm_eval --include_path TASK_DIR)
    """
    folder = Path(site_dir) if site_dir else default_site_dir()
    if remove:
        path = folder / PTH_FILE
        if path.exists():
            path.unlink()
            print(f"removed {path}")
        else:
            print(f"no hook at {path}")
        return
    print(f"installed {write_pth(folder)}")
    for name in tasks or ():
        print(f"lm-eval task {lm_eval_task_name(name)}: {write_lm_eval_task(name, task_dir)}")
