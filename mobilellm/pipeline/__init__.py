"""The whole MobileLLM-Pro recipe as one resumable pipeline of stages (`mobilellm pipeline`).

    from recipes.pipeline import get_plan
    from mobilellm.pipeline import build_stages, run_pipeline, write_report
    plan = get_plan("starter")
    records = run_pipeline(build_stages(plan), "runs/starter")
    write_report(plan, "runs/starter")
"""

from .plan import (BaselineSpec, Compute, CorpusSpec, EvalSpec, ExportSpec, InstructSpec, MergeSpec, MixSpec, Plan,
                   RecipeCall)
from .report import write_report
from .runner import PipelineError, Record, Stage, StageResult, StageRun, content_hash, read_record, run_pipeline
from .stages import build_stages, dry_run_text

__all__ = ["BaselineSpec", "Compute", "CorpusSpec", "EvalSpec", "ExportSpec", "InstructSpec", "MergeSpec", "MixSpec",
           "PipelineError", "Plan", "RecipeCall", "Record", "Stage", "StageResult", "StageRun", "build_stages",
           "content_hash", "dry_run_text", "read_record", "run_pipeline", "write_report"]
