"""The value types of a profile's keys, shared by every section: counts, bit-widths, rates, dataset
names and granularities, each with its range and the error that names the fix."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BeforeValidator, Field

from ..quant.quantizer import GRANULARITIES
from ..targets.names import check_name
from ..targets.sources import DATASET_INFO


def _whole(value):
    """A count written as a float (40.0) is refused here, with its fix, rather than passed on as
    written to crash a notebook (`Profile.set_in` hands the file's own values to the code)."""
    if isinstance(value, float):
        raise ValueError(f"a count is an integer: write {value:g} without a decimal point")
    return value


Count = BeforeValidator(_whole)
Bits = Annotated[int, Count, Field(ge=2, le=8)]


Positive = Annotated[int, Count, Field(ge=1)]


Rate = Annotated[float, Field(gt=0)]


# one of DATASET_INFO, or one relabelled (fashion_mnist~01234-----: a class split); a wrong name
# is refused with the valid names and the relabelling rule
Dataset = Annotated[str, AfterValidator(check_name)]
DATASET_NAMES = " / ".join(DATASET_INFO) + ", or one relabelled: name~labels (qg.targets.names)"


Granularity = Literal[GRANULARITIES]
