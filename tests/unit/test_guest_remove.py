"""RemoveContainer in the guest (carapace.guest.containers.ContainerService.remove):
the answer comes once the container's processes are gone and it is forgotten; crun's
delete and the bundle's removal follow, and a container created again with the same
id waits for them. crun here is a stand-in whose delete waits for the test (what is
tested is the agent's order of steps, not crun)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from carapace.guest.containers import ContainerService
from carapace.guest.crun import CrunError
from carapace.guest.pod import Container, Pod, Process
from carapace.protocols import agent_pb2 as pb
from carapace.ttrpc import Code, TtrpcError


class SlowCrun:
    """crun whose delete ends when the test says (or fails, if told to)."""

    def __init__(self, fail: bool = False) -> None:
        self.release = asyncio.Event()
        self.deleted: list[str] = []
        self.fail = fail

    async def delete(self, cid: str) -> None:
        await self.release.wait()
        self.deleted.append(cid)
        if self.fail:
            raise CrunError(f"crun delete {cid}: exit status 1")


def pod_with(tmp_path: Path, crun: SlowCrun, cid: str = "c1") -> tuple[Pod, Path]:
    pod = Pod()
    pod._crun = crun  # type: ignore[assignment]
    bundle = tmp_path / cid
    (bundle / "upper" / "etc").mkdir(parents=True)
    (bundle / "config.json").write_text("{}")
    init = Process(container_id=cid, exec_id="", terminal=False, pid=0)
    init.exit = asyncio.get_running_loop().create_future()
    init.exit.set_result(0)  # exited already
    pod.containers[cid] = Container(cid, str(bundle), str(bundle / "rootfs"), [], init)
    return pod, bundle


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def _test_answers_before_crun_deletes_and_removes_the_bundle_after(tmp_path: Path) -> None:
    crun = SlowCrun()
    pod, bundle = pod_with(tmp_path, crun)
    service = ContainerService(pod)
    await asyncio.wait_for(
        service.remove_container(pb.RemoveContainerRequest(container_id="c1")), 5
    )
    assert "c1" not in pod.containers
    assert bundle.exists() and crun.deleted == []  # crun's delete has not ended yet
    waiting = asyncio.ensure_future(service.deleted("c1"))
    await settle()
    assert not waiting.done()
    crun.release.set()
    await asyncio.wait_for(waiting, 5)
    assert crun.deleted == ["c1"]
    assert not bundle.exists()
    await settle()
    assert service._deleting == {}  # forgotten once done


async def _test_a_failed_delete_is_logged_and_the_bundle_still_goes(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    crun = SlowCrun(fail=True)
    pod, bundle = pod_with(tmp_path, crun)
    service = ContainerService(pod)
    await service.remove("c1", 1)
    crun.release.set()
    await asyncio.wait_for(service.deleted("c1"), 5)
    assert not bundle.exists()
    assert "crun delete c1: exit status 1" in caplog.text


async def _test_create_with_the_same_id_waits_for_the_delete(tmp_path: Path) -> None:
    crun = SlowCrun()
    pod, _ = pod_with(tmp_path, crun)
    service = ContainerService(pod)
    await service.remove("c1", 1)
    # a rootfs that does not exist: the create fails, but only after the wait
    missing = str(tmp_path / "none")
    req = pb.CreateContainerRequest(container_id="c1", oci_spec=b"{}", rootfs=missing)
    create = asyncio.ensure_future(service.create_container(req))
    await settle()
    assert not create.done()
    crun.release.set()
    with pytest.raises(TtrpcError) as e:
        await asyncio.wait_for(create, 5)
    assert e.value.code == Code.NOT_FOUND
    assert crun.deleted == ["c1"]


async def _test_remove_of_a_removed_container_is_not_found(tmp_path: Path) -> None:
    crun = SlowCrun()
    pod, _ = pod_with(tmp_path, crun)
    service = ContainerService(pod)
    await service.remove("c1", 1)
    with pytest.raises(TtrpcError) as e:
        await service.remove_container(pb.RemoveContainerRequest(container_id="c1"))
    assert e.value.code == Code.NOT_FOUND
    crun.release.set()
    await service.deleted("c1")


def test_answers_before_crun_deletes_and_removes_the_bundle_after(tmp_path: Path) -> None:
    asyncio.run(_test_answers_before_crun_deletes_and_removes_the_bundle_after(tmp_path))


def test_a_failed_delete_is_logged_and_the_bundle_still_goes(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    asyncio.run(_test_a_failed_delete_is_logged_and_the_bundle_still_goes(tmp_path, caplog))


def test_create_with_the_same_id_waits_for_the_delete(tmp_path: Path) -> None:
    asyncio.run(_test_create_with_the_same_id_waits_for_the_delete(tmp_path))


def test_remove_of_a_removed_container_is_not_found(tmp_path: Path) -> None:
    asyncio.run(_test_remove_of_a_removed_container_is_not_found(tmp_path))
