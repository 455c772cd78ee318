"""`python -m tools.meshctl`: the same as the `meshctl` console script (tools/meshctl/main.py), for a checkout
run without installing it (`PYTHONPATH=$PWD:$PWD/proto python -m tools.meshctl get nodes`)."""

import sys

from tools.meshctl.main import main

sys.exit(main())
