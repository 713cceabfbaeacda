"""`mobilellm lm-eval-hook`: make `lm_eval --model mobilellm` work in this Python environment."""

from __future__ import annotations

from pathlib import Path

from ..eval.lm_eval_hook import PTH_FILE, default_site_dir, write_pth


def lm_eval_hook(*, remove: bool = False, site_dir: Path | None = None) -> None:
    """Install (or remove) the start-up hook that registers the lm-eval model `mobilellm`.

    lm-eval has no plugin mechanism for models; the hook is a one-line .pth file in site-packages that
    registers our adapter lazily when lm_eval's registry is imported. Then:
    lm_eval --model mobilellm --model_args pretrained=FOLDER --tasks hellaswag

    Args:
        remove: delete the hook instead of installing it
        site_dir: site-packages folder to use (default: this Python's, or the user site when read-only)
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
