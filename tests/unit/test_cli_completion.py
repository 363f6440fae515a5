"""Completion's pure parts: the variables click's scripts set, and the CLI's answer under click 7."""

from __future__ import annotations

from tenbox_ctl import complete


def test_each_name_has_its_own_variable():
    assert complete.complete_var("tenbox") == "_TENBOX_COMPLETE"
    assert complete.complete_var("tenboxctl") == "_TENBOXCTL_COMPLETE"


def test_under_click_7_a_completion_request_runs_nothing(monkeypatch):
    monkeypatch.setattr(complete, "CLICK_8", False)
    assert complete.answering_old_click("tenbox", {"_TENBOX_COMPLETE": "bash_complete"})
    assert not complete.answering_old_click("tenbox", {})
    assert complete.completes(complete.vm_names) == {}
    monkeypatch.setattr(complete, "CLICK_8", True)
    assert not complete.answering_old_click("tenbox", {"_TENBOX_COMPLETE": "bash_complete"})
    assert complete.completes(complete.vm_names) == {"shell_complete": complete.vm_names}


def test_the_generator_refuses_other_shells_and_names(capsys):
    assert complete.main(["fish", "tenbox"]) == 2
    assert complete.main(["bash", "rm"]) == 2
    if complete.CLICK_8:
        assert complete.main(["bash", "tenbox"]) == 0 and "_tenbox_completion" in capsys.readouterr().out
    else:  # Debian 11's click 7 has no script generator: one line saying what is needed
        assert complete.main(["bash", "tenbox"]) == 1 and "needs click 8" in capsys.readouterr().err
