"""The control socket's admission rule: per-uid and total caps for users, root counted apart."""

from tenbox_supervisor.api import loggable_key
from tenbox_supervisor.control import ClientCounts


def test_one_user_gets_its_share_and_no_more():
    c = ClientCounts(total_max=4, per_uid_max=2, root_max=1)
    assert c.admit(1000) is None and c.admit(1000) is None
    assert c.admit(1000) == "uid 1000 has 2 connections open"
    c.release(1000)
    assert c.admit(1000) is None


def test_users_together_are_capped_and_root_still_gets_in():
    c = ClientCounts(total_max=4, per_uid_max=2, root_max=2)
    for uid in (1000, 1000, 1001, 1001):
        assert c.admit(uid) is None
    assert c.admit(1002) == "4 connections of users other than root are open"
    assert c.admit(0) is None and c.admit(0) is None
    assert c.admit(0) == "root has 2 connections open"
    c.release(0)
    assert c.admit(0) is None
    assert dict(c.by_uid) == {1000: 2, 1001: 2, 0: 2}


def test_only_valid_ids_reach_the_log():
    assert loggable_key({"vm_id": "web-1"}) == "web-1"
    assert loggable_key({"name": "web"}) == "web"
    assert loggable_key({}) == ""
    assert loggable_key({"vm_id": "a\nforged line"}) == "(invalid id or name)"
    assert loggable_key({"vm_id": ["list"]}) == "(invalid id or name)"
