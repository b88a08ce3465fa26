"""``python -m critbatch.launch JOB_DIR [--threads N]``: run one job in this process (see
:mod:`critbatch.launch.worker`); under ``torchrun`` every rank runs it."""

from .worker import main

raise SystemExit(main())
