"""Tools: fit, predict, evaluate and cross-validate AGL models."""

from .cross_validate import *  # noqa: F403
from .cross_validate import __all__ as _cv_all
from .evaluate import *  # noqa: F403
from .evaluate import __all__ as _eval_all
from .fit import *  # noqa: F403
from .fit import __all__ as _fit_all
from .predict import *  # noqa: F403
from .predict import __all__ as _pred_all

__all__ = [*_fit_all, *_pred_all, *_eval_all, *_cv_all]
