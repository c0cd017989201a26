"""One module per method family; importing this package registers every method in the registry."""

from tallmasks.merging.methods import (  # noqa: F401  (registration)
    breadcrumbs,
    cart,
    dare,
    emr,
    iso,
    lines,
    magmax,
    magnitude,
    model_stock,
    pcb,
    seed_ties,
    tall,
    task_arithmetic,
    ties,
    tsv,
    wudi,
)
