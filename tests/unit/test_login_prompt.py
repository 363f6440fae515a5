"""login_prompt (tests/framework/process.py): getty's prompt on a console that others write to as well."""

from tests.framework.process import login_prompt

ISSUE = "Debian GNU/Linux 12 %s ttyS0\n\n"
# beta's console in a CI lane (2026-12-07): cloud-init's lines came between the host name and "login:".
SPLIT = (ISSUE % "beta" + "beta [  131.383896] cloud-init[330]: SHA256:OKhP2NSLd root@beta\n"
         "login: [  131.666504] cloud-init[330]: The key's randomart image is:\n")

# tenbox's console in a CI lane (2026-12-07): the kernel's lines came between the host name and its space.
SPLIT_BEFORE_SPACE = (ISSUE % "tenbox" + "tenbox[   63.899468] SVM: Virtual GIF supported\n"
                      "[   63.921615] SVM: PMU virtualization is disabled\n"
                      " login: [   64.263632] powernow_k8: Power state transitions not supported\n")


def test_a_prompt_in_one_line_is_one_prompt():
    assert len(login_prompt("alpha").findall(ISSUE % "alpha" + "alpha login: ")) == 1


def test_a_prompt_split_by_cloud_init_lines_is_one_prompt():
    assert len(login_prompt("beta").findall(SPLIT)) == 1


def test_a_prompt_split_by_kernel_lines_before_its_space_is_one_prompt():
    assert len(login_prompt("tenbox").findall(SPLIT_BEFORE_SPACE)) == 1


def test_two_boots_are_two_prompts():
    text = ISSUE % "alpha" + "alpha login: \n[   42.1] reboot: Restarting system\n" + ISSUE % "alpha" + "alpha login: "
    assert len(login_prompt("alpha").findall(text)) == 2


def test_no_prompt_of_another_host_or_before_getty():
    assert login_prompt("alpha").findall(SPLIT) == []
    assert login_prompt("beta").findall(ISSUE % "beta" + "[  12.0] cloud-init[330]: ci-info: root@beta\n") == []
    assert login_prompt("beta").findall("alphabeta login: ") == []
    assert login_prompt("beta").findall("betamax login: ") == [] and login_prompt("beta").findall("betamax\nlogin: ") == []
    assert login_prompt("tenbox").findall(SPLIT_BEFORE_SPACE.replace(" login:", " password:")) == []
    # "login:" more than three lines after the host name is not this prompt
    assert login_prompt("beta").findall("beta x\n1\n2\n3\nlogin: ") == []
