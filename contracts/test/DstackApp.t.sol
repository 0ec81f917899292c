// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {AppBootInfo, IAppAuth, IERC165} from "../src/IAppAuth.sol";
import {DstackApp} from "../src/DstackApp.sol";
import {SealroomTest, Vm} from "./Base.t.sol";

contract DstackAppTest is SealroomTest {
    DstackApp internal app; // 3 owners, k = 2, TCB must be up to date

    function setUp() public {
        app = _deployApp(3, 2);
        app.proposeComposeHash(HASH, URI);
    }

    // ------------------------------------------------------------------ constructor

    function test_Constructor_StoresOwnersThresholdAndSettings() public view {
        address[] memory listed = app.owners();
        require(listed.length == 3, "owner count");
        for (uint256 i = 0; i < 3; i++) {
            require(listed[i] == _owner(i) && app.isOwner(_owner(i)), "owner listed");
        }
        require(!app.isOwner(outsider), "outsider is no owner");
        require(app.threshold() == 2, "threshold");
        require(app.kmsSigner() == kms, "kms signer");
        require(app.requireTcbUpToDate(), "tcb flag");
        require(app.epsilonBudget() == BUDGET && app.epsilonSpent() == 0 && app.epsilonRemaining() == BUDGET, "budget");
    }

    function test_Constructor_ZeroThreshold() public {
        address[] memory list = _owners(3);
        vm.expectRevert(DstackApp.InvalidThreshold.selector);
        new DstackApp(list, 0, BUDGET, kms, true);
    }

    function test_Constructor_ThresholdAboveOwnerCount(uint256 n, uint256 k) public {
        n = _bound(n, 0, MAX_OWNERS);
        k = _bound(k, n + 1, type(uint256).max);
        address[] memory list = _owners(n);
        vm.expectRevert(DstackApp.InvalidThreshold.selector);
        new DstackApp(list, k, BUDGET, kms, true);
    }

    function test_Constructor_DuplicateOwner() public {
        address[] memory list = _owners(3);
        list[2] = list[0];
        vm.expectRevert(abi.encodeWithSelector(DstackApp.DuplicateOwner.selector, list[0]));
        new DstackApp(list, 2, BUDGET, kms, true);
    }

    function test_Constructor_ZeroOwnerAddress() public {
        address[] memory list = _owners(3);
        list[1] = address(0);
        vm.expectRevert(DstackApp.ZeroAddress.selector);
        new DstackApp(list, 2, BUDGET, kms, true);
    }

    function test_Constructor_ZeroKmsSigner() public {
        address[] memory list = _owners(3);
        vm.expectRevert(DstackApp.ZeroAddress.selector);
        new DstackApp(list, 2, BUDGET, address(0), true);
    }

    // ------------------------------------------------------------------ propose

    function test_ProposeComposeHash_RecordsUriAndEmits() public {
        vm.expectEmit(address(app));
        emit DstackApp.ComposeHashProposed(OTHER_HASH, outsider, "ipfs://compose");
        vm.prank(outsider); // anyone may propose
        app.proposeComposeHash(OTHER_HASH, "ipfs://compose");

        (bool proposed, bool allowed, bool revoked, uint256 approvals, string memory uri) =
            app.composeHashState(OTHER_HASH);
        require(proposed && !allowed && !revoked && approvals == 0, "fresh proposal state");
        require(keccak256(bytes(uri)) == keccak256("ipfs://compose"), "uri");
    }

    function test_ProposeComposeHash_AlreadyProposed() public {
        vm.expectRevert(abi.encodeWithSelector(DstackApp.AlreadyProposed.selector, HASH));
        app.proposeComposeHash(HASH, "other uri");
    }

    function test_ProposeComposeHash_AfterRevokeFails() public {
        vm.prank(_owner(0));
        app.revokeComposeHash(HASH);
        vm.expectRevert(abi.encodeWithSelector(DstackApp.AlreadyProposed.selector, HASH));
        app.proposeComposeHash(HASH, URI);
    }

    // ------------------------------------------------------------------ approve

    function test_ApproveComposeHash_ThresholdReachedExactlyAtK(uint256 n, uint256 k) public {
        n = _bound(n, 1, MAX_OWNERS);
        k = _bound(k, 1, n);
        DstackApp fuzzed = _deployApp(n, k);
        fuzzed.proposeComposeHash(HASH, URI);
        AppBootInfo memory boot = _bootInfo(address(fuzzed), HASH, "UpToDate");

        for (uint256 i = 0; i + 1 < k; i++) {
            _approveBy(fuzzed, HASH, i);
        }
        require(!fuzzed.allowedComposeHashes(HASH), "allowed before k approvals");
        (bool ok, string memory reason) = fuzzed.isAppAllowed(boot);
        _assertVerdict(ok, reason, false, "Compose hash not allowed");

        _approveBy(fuzzed, HASH, k - 1);
        require(fuzzed.allowedComposeHashes(HASH), "not allowed at k approvals");
        (ok, reason) = fuzzed.isAppAllowed(boot);
        _assertVerdict(ok, reason, true, "");
        (,,, uint256 approvals,) = fuzzed.composeHashState(HASH);
        require(approvals == k, "approval count");
    }

    function test_ApproveComposeHash_EmitsAddedOnlyAtThreshold() public {
        vm.recordLogs();
        for (uint256 i = 0; i < 3; i++) {
            _approveBy(app, HASH, i);
        }
        Vm.Log[] memory logs = vm.getRecordedLogs();
        uint256 added;
        uint256 approvedEvents;
        for (uint256 i = 0; i < logs.length; i++) {
            if (logs[i].topics[0] == DstackApp.ComposeHashAdded.selector) {
                added++;
                require(approvedEvents == 2, "ComposeHashAdded must follow the k-th approval");
                require(abi.decode(logs[i].data, (bytes32)) == HASH, "added hash");
            } else if (logs[i].topics[0] == DstackApp.ComposeHashApproved.selector) {
                approvedEvents++;
                require(abi.decode(logs[i].data, (uint256)) == approvedEvents, "running approval count");
            }
        }
        require(added == 1 && approvedEvents == 3, "event counts");
    }

    function test_ApproveComposeHash_NonOwner(address caller) public {
        vm.assume(!app.isOwner(caller));
        vm.expectRevert(abi.encodeWithSelector(DstackApp.NotOwner.selector, caller));
        vm.prank(caller);
        app.approveComposeHash(HASH);
    }

    function test_ApproveComposeHash_CountsOnce() public {
        _approveBy(app, HASH, 0);
        vm.expectRevert(abi.encodeWithSelector(DstackApp.AlreadyApproved.selector, HASH, _owner(0)));
        _approveBy(app, HASH, 0);
        require(!app.allowedComposeHashes(HASH), "one owner approving twice must not reach k = 2");
        (,,, uint256 approvals,) = app.composeHashState(HASH);
        require(approvals == 1, "approval counted twice");
    }

    function test_ApproveComposeHash_UnknownHash() public {
        vm.expectRevert(abi.encodeWithSelector(DstackApp.UnknownComposeHash.selector, OTHER_HASH));
        _approveBy(app, OTHER_HASH, 0);
    }

    function test_ApproveComposeHash_AfterThresholdRecordsConsent() public {
        _approveBy(app, HASH, 2);
        _approveBy(app, HASH, 0);
        require(app.allowedComposeHashes(HASH), "allowed at k");
        require(!app.hasApproved(HASH, _owner(1)), "owner 1 has not consented yet");
        _approveBy(app, HASH, 1);
        require(app.hasApproved(HASH, _owner(1)), "late consent recorded");

        address[] memory order = app.approvers(HASH);
        require(order.length == 3, "approver count");
        require(order[0] == _owner(2) && order[1] == _owner(0) && order[2] == _owner(1), "approval order");
    }

    function test_ApproveComposeHash_AfterRevokeFails() public {
        _approveBy(app, HASH, 0);
        vm.prank(_owner(1));
        app.revokeComposeHash(HASH);
        vm.expectRevert(abi.encodeWithSelector(DstackApp.ComposeHashIsRevoked.selector, HASH));
        _approveBy(app, HASH, 2);
    }

    // ------------------------------------------------------------------ approve by EIP-712 signature

    function test_ApprovalDigest_FollowsEip712() public view {
        bytes32 domain = keccak256(
            abi.encode(
                keccak256("EIP712Domain(string name,string version,uint256 chainId,address verifyingContract)"),
                keccak256("Sealroom DstackApp"),
                keccak256("1"),
                block.chainid,
                address(app)
            )
        );
        bytes32 structHash =
            keccak256(abi.encode(keccak256("ApproveComposeHash(bytes32 composeHash,uint256 deadline)"), HASH, 1234));
        require(app.DOMAIN_SEPARATOR() == domain, "domain separator");
        require(app.approvalDigest(HASH, 1234) == keccak256(abi.encodePacked("\x19\x01", domain, structHash)), "digest");
    }

    function test_ApproveComposeHashBySig_RelayedByAnyone() public {
        uint256 deadline = block.timestamp + 1 hours;
        bytes memory signature = _signApproval(app, HASH, deadline, 1);
        vm.expectEmit(address(app));
        emit DstackApp.ComposeHashApproved(HASH, _owner(1), 1);
        vm.prank(outsider);
        app.approveComposeHashBySig(HASH, _owner(1), deadline, signature);
        require(app.hasApproved(HASH, _owner(1)), "relayed approval recorded");
    }

    function test_ApproveComposeHashBySig_AcceptsVZeroOrOne() public {
        uint256 deadline = block.timestamp;
        (uint8 v, bytes32 r, bytes32 s) = vm.sign(_ownerKey(0), app.approvalDigest(HASH, deadline));
        app.approveComposeHashBySig(HASH, _owner(0), deadline, abi.encodePacked(r, s, v - 27));
        require(app.hasApproved(HASH, _owner(0)), "v in {0,1} accepted");
    }

    function test_ApproveComposeHashBySig_ReachesThresholdLikeTransactions() public {
        uint256 deadline = block.timestamp + 1;
        app.approveComposeHashBySig(HASH, _owner(0), deadline, _signApproval(app, HASH, deadline, 0));
        app.approveComposeHashBySig(HASH, _owner(2), deadline, _signApproval(app, HASH, deadline, 2));
        require(app.allowedComposeHashes(HASH), "two signatures reach k = 2");
    }

    function test_ApproveComposeHashBySig_WrongSigner() public {
        uint256 deadline = block.timestamp + 1 hours;
        bytes memory signedByOwner2 = _signApproval(app, HASH, deadline, 2);
        vm.expectRevert(DstackApp.InvalidSignature.selector);
        app.approveComposeHashBySig(HASH, _owner(0), deadline, signedByOwner2);
    }

    function test_ApproveComposeHashBySig_SignedByOutsiderKey() public {
        uint256 deadline = block.timestamp + 1 hours;
        (uint8 v, bytes32 r, bytes32 s) = vm.sign(0xBADBAD, app.approvalDigest(HASH, deadline));
        vm.expectRevert(DstackApp.InvalidSignature.selector);
        app.approveComposeHashBySig(HASH, _owner(0), deadline, abi.encodePacked(r, s, v));
    }

    function test_ApproveComposeHashBySig_NonOwner() public {
        uint256 deadline = block.timestamp + 1 hours;
        address stranger = vm.addr(0xBADBAD);
        (uint8 v, bytes32 r, bytes32 s) = vm.sign(0xBADBAD, app.approvalDigest(HASH, deadline));
        vm.expectRevert(abi.encodeWithSelector(DstackApp.NotOwner.selector, stranger));
        app.approveComposeHashBySig(HASH, stranger, deadline, abi.encodePacked(r, s, v));
    }

    function test_ApproveComposeHashBySig_Replayed() public {
        uint256 deadline = block.timestamp + 1 hours;
        bytes memory signature = _signApproval(app, HASH, deadline, 0);
        app.approveComposeHashBySig(HASH, _owner(0), deadline, signature);
        vm.expectRevert(abi.encodeWithSelector(DstackApp.AlreadyApproved.selector, HASH, _owner(0)));
        app.approveComposeHashBySig(HASH, _owner(0), deadline, signature);
    }

    function test_ApproveComposeHashBySig_OtherVerifyingContract() public {
        DstackApp twin = _deployApp(3, 2); // same owners, same chain: only the address differs
        twin.proposeComposeHash(HASH, URI);
        uint256 deadline = block.timestamp + 1 hours;
        bytes memory signedForTwin = _signApproval(twin, HASH, deadline, 0);
        vm.expectRevert(DstackApp.InvalidSignature.selector);
        app.approveComposeHashBySig(HASH, _owner(0), deadline, signedForTwin);
    }

    function test_ApproveComposeHashBySig_OtherChainId() public {
        uint256 deadline = block.timestamp + 1 hours;
        bytes memory signedHere = _signApproval(app, HASH, deadline, 0);
        bytes32 domainHere = app.DOMAIN_SEPARATOR();
        vm.chainId(block.chainid + 1);
        require(app.DOMAIN_SEPARATOR() != domainHere, "domain separator must follow block.chainid");
        vm.expectRevert(DstackApp.InvalidSignature.selector);
        app.approveComposeHashBySig(HASH, _owner(0), deadline, signedHere);
    }

    function test_ApproveComposeHashBySig_OtherComposeHash() public {
        app.proposeComposeHash(OTHER_HASH, URI);
        uint256 deadline = block.timestamp + 1 hours;
        bytes memory signedForHash = _signApproval(app, HASH, deadline, 0);
        vm.expectRevert(DstackApp.InvalidSignature.selector);
        app.approveComposeHashBySig(OTHER_HASH, _owner(0), deadline, signedForHash);
    }

    function test_ApproveComposeHashBySig_OtherDeadline() public {
        uint256 deadline = block.timestamp + 1 hours;
        bytes memory signature = _signApproval(app, HASH, deadline, 0);
        vm.expectRevert(DstackApp.InvalidSignature.selector);
        app.approveComposeHashBySig(HASH, _owner(0), deadline + 1 days, signature);
    }

    function test_ApproveComposeHashBySig_Expired(uint256 lateBy) public {
        lateBy = _bound(lateBy, 1, 365 days);
        uint256 deadline = block.timestamp + 1 hours;
        bytes memory signature = _signApproval(app, HASH, deadline, 0);
        vm.warp(deadline + lateBy);
        vm.expectRevert(abi.encodeWithSelector(DstackApp.SignatureExpired.selector, deadline));
        app.approveComposeHashBySig(HASH, _owner(0), deadline, signature);
    }

    function test_ApproveComposeHashBySig_HighS() public {
        uint256 deadline = block.timestamp + 1 hours;
        (uint8 v, bytes32 r, bytes32 s) = vm.sign(_ownerKey(0), app.approvalDigest(HASH, deadline));
        // The malleable twin (r, n - s, flipped v) recovers to the same owner through plain ecrecover.
        bytes32 highS = bytes32(SECP256K1_ORDER - uint256(s));
        uint8 flippedV = v == 27 ? 28 : 27;
        vm.expectRevert(DstackApp.InvalidSignature.selector);
        app.approveComposeHashBySig(HASH, _owner(0), deadline, abi.encodePacked(r, highS, flippedV));
    }

    function test_ApproveComposeHashBySig_WrongLength() public {
        uint256 deadline = block.timestamp + 1 hours;
        (uint8 v, bytes32 r, bytes32 s) = vm.sign(_ownerKey(0), app.approvalDigest(HASH, deadline));
        vm.expectRevert(DstackApp.InvalidSignature.selector);
        app.approveComposeHashBySig(HASH, _owner(0), deadline, abi.encodePacked(r, s, v, uint8(0)));
        vm.expectRevert(DstackApp.InvalidSignature.selector);
        app.approveComposeHashBySig(HASH, _owner(0), deadline, abi.encodePacked(r, s));
    }

    function test_ApproveComposeHashBySig_BadV(uint8 v) public {
        vm.assume(v != 0 && v != 1 && v != 27 && v != 28);
        uint256 deadline = block.timestamp + 1 hours;
        (, bytes32 r, bytes32 s) = vm.sign(_ownerKey(0), app.approvalDigest(HASH, deadline));
        vm.expectRevert(DstackApp.InvalidSignature.selector);
        app.approveComposeHashBySig(HASH, _owner(0), deadline, abi.encodePacked(r, s, v));
    }

    function test_ApproveComposeHashBySig_ZeroRecovery() public {
        // r = 0 is not a curve point: ecrecover returns address(0), which must never count as a signer.
        uint256 deadline = block.timestamp + 1 hours;
        vm.expectRevert(DstackApp.InvalidSignature.selector);
        app.approveComposeHashBySig(HASH, _owner(0), deadline, abi.encodePacked(bytes32(0), bytes32(uint256(1)), uint8(27)));
    }

    function test_ApproveComposeHashBySig_AfterRevokeFails() public {
        uint256 deadline = block.timestamp + 1 hours;
        bytes memory signature = _signApproval(app, HASH, deadline, 0);
        vm.prank(_owner(1));
        app.revokeComposeHash(HASH);
        vm.expectRevert(abi.encodeWithSelector(DstackApp.ComposeHashIsRevoked.selector, HASH));
        app.approveComposeHashBySig(HASH, _owner(0), deadline, signature);
    }

    // ------------------------------------------------------------------ revoke

    function test_RevokeComposeHash_AnySingleOwnerIsFinal(uint256 revoker) public {
        revoker = _bound(revoker, 0, 2);
        _approveBy(app, HASH, 0);
        _approveBy(app, HASH, 1);
        AppBootInfo memory boot = _bootInfo(address(app), HASH, "UpToDate");
        (bool ok, string memory reason) = app.isAppAllowed(boot);
        _assertVerdict(ok, reason, true, "");

        vm.expectEmit(address(app));
        emit DstackApp.ComposeHashRevoked(HASH, _owner(revoker));
        vm.expectEmit(address(app));
        emit DstackApp.ComposeHashRemoved(HASH);
        vm.prank(_owner(revoker));
        app.revokeComposeHash(HASH);

        require(!app.allowedComposeHashes(HASH), "revoked hash still allowed");
        (ok, reason) = app.isAppAllowed(boot);
        _assertVerdict(ok, reason, false, "Compose hash revoked");
        (, bool allowed, bool revoked, uint256 approvals,) = app.composeHashState(HASH);
        require(!allowed && revoked && approvals == 2, "state after revoke");
        // Further approvals cannot resurrect it.
        vm.expectRevert(abi.encodeWithSelector(DstackApp.ComposeHashIsRevoked.selector, HASH));
        _approveBy(app, HASH, 2);
    }

    function test_RevokeComposeHash_BeforeThresholdStillEmitsRemoved() public {
        vm.expectEmit(address(app));
        emit DstackApp.ComposeHashRemoved(HASH);
        vm.prank(_owner(2));
        app.revokeComposeHash(HASH);
        (bool ok, string memory reason) = app.isAppAllowed(_bootInfo(address(app), HASH, "UpToDate"));
        _assertVerdict(ok, reason, false, "Compose hash revoked");
    }

    function test_RevokeComposeHash_NonOwner(address caller) public {
        vm.assume(!app.isOwner(caller));
        vm.expectRevert(abi.encodeWithSelector(DstackApp.NotOwner.selector, caller));
        vm.prank(caller);
        app.revokeComposeHash(HASH);
    }

    function test_RevokeComposeHash_Twice() public {
        vm.prank(_owner(0));
        app.revokeComposeHash(HASH);
        vm.expectRevert(abi.encodeWithSelector(DstackApp.ComposeHashIsRevoked.selector, HASH));
        vm.prank(_owner(1));
        app.revokeComposeHash(HASH);
    }

    function test_RevokeComposeHash_UnknownHash() public {
        vm.expectRevert(abi.encodeWithSelector(DstackApp.UnknownComposeHash.selector, OTHER_HASH));
        vm.prank(_owner(0));
        app.revokeComposeHash(OTHER_HASH);
    }

    // ------------------------------------------------------------------ isAppAllowed

    function test_IsAppAllowed_AppIdMismatch() public {
        _approveBy(app, HASH, 0);
        _approveBy(app, HASH, 1);
        (bool ok, string memory reason) = app.isAppAllowed(_bootInfo(address(0xA99), HASH, "UpToDate"));
        _assertVerdict(ok, reason, false, "App id mismatch");
    }

    function test_IsAppAllowed_TcbNotUpToDate() public {
        _approveBy(app, HASH, 0);
        _approveBy(app, HASH, 1);
        (bool ok, string memory reason) = app.isAppAllowed(_bootInfo(address(app), HASH, "OutOfDate"));
        _assertVerdict(ok, reason, false, "TCB status is not up to date");
    }

    function test_IsAppAllowed_TcbCheckedBeforeRevocation() public {
        vm.prank(_owner(0));
        app.revokeComposeHash(HASH);
        (bool ok, string memory reason) = app.isAppAllowed(_bootInfo(address(app), HASH, ""));
        _assertVerdict(ok, reason, false, "TCB status is not up to date");
    }

    function test_IsAppAllowed_TcbIgnoredWhenNotRequired() public {
        DstackApp lenient = new DstackApp(_owners(2), 1, BUDGET, kms, false);
        lenient.proposeComposeHash(HASH, URI);
        _approveBy(lenient, HASH, 0);
        (bool ok, string memory reason) = lenient.isAppAllowed(_bootInfo(address(lenient), HASH, "OutOfDate"));
        _assertVerdict(ok, reason, true, "");
    }

    function test_IsAppAllowed_UnproposedHash() public view {
        (bool ok, string memory reason) = app.isAppAllowed(_bootInfo(address(app), OTHER_HASH, "UpToDate"));
        _assertVerdict(ok, reason, false, "Compose hash not allowed");
    }

    // ------------------------------------------------------------------ ERC-165

    function test_SupportsInterface_Erc165AndAppAuth() public view {
        require(type(IAppAuth).interfaceId == 0x1e079198, "IAppAuth id must equal dstack's");
        require(type(IERC165).interfaceId == 0x01ffc9a7, "ERC-165 id");
        require(app.supportsInterface(0x01ffc9a7), "ERC-165 supported");
        require(app.supportsInterface(0x1e079198), "IAppAuth supported");
    }

    function test_SupportsInterface_OtherIds(bytes4 id) public view {
        vm.assume(id != 0x01ffc9a7 && id != 0x1e079198);
        require(!app.supportsInterface(id), "unexpected interface");
    }
}
