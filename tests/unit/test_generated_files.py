"""Generated artifacts stay in step with their sources."""

from tools import gendocs, genproto


def test_configuration_reference_is_current():
    assert gendocs.main(["--check"]) == 0, "run `python -m tools.gendocs`"


def test_grpc_stubs_are_current():
    assert genproto.main(["--check"]) == 0, "run `python -m tools.genproto`"
