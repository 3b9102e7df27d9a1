"""Control handlers are registered next to their code with @handles, against the one
command table of protocol.py."""
import pytest

from l4lb.control import commands, protocol


def test_every_command_has_exactly_one_registered_handler():
    assert set(commands.HANDLERS) == {spec.name for spec in protocol.COMMANDS}
    assert all(hasattr(commands.CommandHandlers, m) for m in commands.HANDLERS.values())


def test_handles_refuses_a_name_the_protocol_does_not_define():
    with pytest.raises(AssertionError, match="no such command"):
        commands.handles("show everything")


def test_handles_refuses_a_second_handler_for_a_command():
    with pytest.raises(AssertionError, match="two handlers"):
        commands.handles("help")(lambda self: None)
