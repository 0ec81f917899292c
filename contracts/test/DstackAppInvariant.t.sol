// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {AppBootInfo} from "../src/IAppAuth.sol";
import {DstackApp} from "../src/DstackApp.sol";
import {SealroomTest} from "./Base.t.sol";

/// @dev Model-based fuzzing: a seed drives a sequence of random actions by random actors (owners, outsiders,
/// the KMS) on an app with random k-of-n. A small model written from the rules predicts each action's exact
/// outcome (success or the precise custom error); after every step the contract's views must agree with the
/// model: allowedComposeHashes == (approvals >= k && !revoked), isAppAllowed gives the matching verdict, and
/// the budget is never overspent.
contract DstackAppInvariantTest is SealroomTest {
    uint256 internal constant HASHES = 3;
    uint256 internal constant STEPS = 48;

    DstackApp internal app;
    uint256 internal n;
    uint256 internal k;
    address[] internal ownerList; // cached: vm.addr per lookup would dominate the run time

    // The model.
    bool[HASHES] internal proposed;
    bool[HASHES] internal revoked;
    uint256[HASHES] internal approvedMask; // bit i: owner i approved
    uint256 internal spent;
    mapping(bytes32 => bool) internal releaseUsed;

    function test_Invariant_AllowedMatchesApprovalsAndRevocation(uint256 seed) public {
        n = _bound(seed, 1, MAX_OWNERS);
        k = _bound(seed >> 8, 1, n);
        ownerList = _owners(n);
        app = new DstackApp(ownerList, k, BUDGET, kms, true);
        // Start with all but the last hash proposed, so that early actions have something to act on.
        for (uint256 h = 0; h + 1 < HASHES; h++) {
            _propose(outsider, h);
        }

        for (uint256 step = 0; step < STEPS; step++) {
            uint256 r = uint256(keccak256(abi.encode(seed, step)));
            // Weighted towards approvals and releases; revocation is rare so that hashes can live to reach k.
            uint256 action = r % 100;
            // Actors 0..n-1 are owners; n is an outsider; n + 1 is the KMS signer.
            address actor = _actor((r >> 8) % (n + 2));
            uint256 h = (r >> 16) % (HASHES + 1) % HASHES; // hash 0 twice as often, to reach high k
            if (action < 6) _propose(actor, h);
            else if (action < 40) _approve(actor, h);
            else if (action < 62) _approveBySig(actor, h, (r >> 24) % (n + 1));
            else if (action < 68) _revoke(actor, h);
            else _recordRelease(r, h, step);
            _checkAgainstModel();
        }
    }

    // ------------------------------------------------------------------ actions and predicted outcomes

    function _propose(address actor, uint256 h) internal {
        bytes memory expected = proposed[h] ? abi.encodeWithSelector(DstackApp.AlreadyProposed.selector, _hash(h)) : bytes("");
        vm.prank(actor);
        _expect(abi.encodeCall(DstackApp.proposeComposeHash, (_hash(h), URI)), expected);
        proposed[h] = true;
    }

    function _approve(address actor, uint256 h) internal {
        bytes memory expected = _approvalError(actor, h);
        vm.prank(actor);
        _expect(abi.encodeCall(DstackApp.approveComposeHash, (_hash(h))), expected);
        if (expected.length == 0) approvedMask[h] |= 1 << _ownerIndex(actor);
    }

    /// @dev Signer index n is an outsider's key, so some relayed approvals claim a non-owner.
    function _approveBySig(address relayer, uint256 h, uint256 signerIndex) internal {
        uint256 key = signerIndex < n ? _ownerKey(signerIndex) : 0xBADBAD;
        address signer = vm.addr(key);
        uint256 deadline = block.timestamp + 1;
        (uint8 v, bytes32 r, bytes32 s) = vm.sign(key, app.approvalDigest(_hash(h), deadline));
        bytes memory expected = _approvalError(signer, h);
        vm.prank(relayer);
        _expect(
            abi.encodeCall(DstackApp.approveComposeHashBySig, (_hash(h), signer, deadline, abi.encodePacked(r, s, v))),
            expected
        );
        if (expected.length == 0) approvedMask[h] |= 1 << signerIndex;
    }

    function _revoke(address actor, uint256 h) internal {
        bytes memory expected;
        if (!_isOwner(actor)) expected = abi.encodeWithSelector(DstackApp.NotOwner.selector, actor);
        else if (!proposed[h]) expected = abi.encodeWithSelector(DstackApp.UnknownComposeHash.selector, _hash(h));
        else if (revoked[h]) expected = abi.encodeWithSelector(DstackApp.ComposeHashIsRevoked.selector, _hash(h));
        vm.prank(actor);
        _expect(abi.encodeCall(DstackApp.revokeComposeHash, (_hash(h))), expected);
        if (expected.length == 0) revoked[h] = true;
    }

    function _recordRelease(uint256 r, uint256 h, uint256 step) internal {
        // Mostly the KMS, naming exactly the owners who approved; sometimes anyone, naming any owners.
        address caller = (r >> 24) % 4 == 0 ? _actor((r >> 32) % (n + 2)) : kms;
        uint256 mask = (r >> 40) % 4 == 0 ? (r >> 48) & ((1 << n) - 1) : approvedMask[h];
        address[] memory named = _ownersIn(mask);
        bytes32 releaseId = keccak256(abi.encode(step % 8)); // collisions on purpose
        uint256 epsilon = (r >> 64) % (BUDGET / 4) + 1;

        bytes memory expected;
        if (caller != kms) expected = abi.encodeWithSelector(DstackApp.NotKmsSigner.selector, caller);
        else if (named.length == 0) expected = abi.encodeWithSelector(DstackApp.EmptyRelease.selector);
        else if (releaseUsed[releaseId]) expected = abi.encodeWithSelector(DstackApp.ReleaseAlreadyRecorded.selector, releaseId);
        else if (revoked[h]) expected = abi.encodeWithSelector(DstackApp.ComposeHashIsRevoked.selector, _hash(h));
        else if (!_modelAllowed(h)) expected = abi.encodeWithSelector(DstackApp.ComposeHashNotAllowed.selector, _hash(h));
        else if (mask & ~approvedMask[h] != 0) {
            expected = abi.encodeWithSelector(DstackApp.OwnerDidNotApprove.selector, _hash(h), ownerList[_lowestBit(mask & ~approvedMask[h])]);
        } else if (spent + epsilon > BUDGET) {
            expected = abi.encodeWithSelector(DstackApp.BudgetExceeded.selector, epsilon, BUDGET - spent);
        }
        vm.prank(caller);
        _expect(abi.encodeCall(DstackApp.recordRelease, (releaseId, _hash(h), named, epsilon)), expected);
        if (expected.length == 0) {
            spent += epsilon;
            releaseUsed[releaseId] = true;
        }
    }

    /// @dev Approve checks in the contract's order: caller/signer is an owner, hash known, not revoked, new.
    function _approvalError(address account, uint256 h) internal view returns (bytes memory) {
        if (!_isOwner(account)) return abi.encodeWithSelector(DstackApp.NotOwner.selector, account);
        if (!proposed[h]) return abi.encodeWithSelector(DstackApp.UnknownComposeHash.selector, _hash(h));
        if (revoked[h]) return abi.encodeWithSelector(DstackApp.ComposeHashIsRevoked.selector, _hash(h));
        if (approvedMask[h] & (1 << _ownerIndex(account)) != 0) {
            return abi.encodeWithSelector(DstackApp.AlreadyApproved.selector, _hash(h), account);
        }
        return "";
    }

    /// @dev Calls the app (the caller pranks first) and requires success iff `expected` is empty, or else
    /// a revert carrying exactly `expected`.
    function _expect(bytes memory callData, bytes memory expected) internal {
        (bool ok, bytes memory returned) = address(app).call(callData);
        if (expected.length == 0) {
            require(ok, "model expected success, contract reverted");
        } else {
            require(!ok, "model expected a revert, contract succeeded");
            require(keccak256(returned) == keccak256(expected), "contract reverted with a different error");
        }
    }

    // ------------------------------------------------------------------ the invariant

    function _checkAgainstModel() internal view {
        for (uint256 h = 0; h < HASHES; h++) {
            bool modelAllowed = _modelAllowed(h);
            (bool isProposed, bool allowed, bool isRevoked, uint256 approvals,) = app.composeHashState(_hash(h));
            require(isProposed == proposed[h] && isRevoked == revoked[h], "proposed/revoked differ");
            require(approvals == _popcount(approvedMask[h]), "approval count differs");
            require(allowed == (approvals >= k && !isRevoked), "allowed != (approvals >= k && !revoked)");
            require(app.allowedComposeHashes(_hash(h)) == modelAllowed, "allowedComposeHashes differs from model");
            for (uint256 i = 0; i < n; i++) {
                require(app.hasApproved(_hash(h), ownerList[i]) == (approvedMask[h] & (1 << i) != 0), "consent differs");
            }

            AppBootInfo memory boot = _bootInfo(address(app), _hash(h), "UpToDate");
            (bool ok, string memory reason) = app.isAppAllowed(boot);
            if (modelAllowed) _assertVerdict(ok, reason, true, "");
            else if (revoked[h]) _assertVerdict(ok, reason, false, "Compose hash revoked");
            else _assertVerdict(ok, reason, false, "Compose hash not allowed");
        }
        require(app.epsilonSpent() == spent && spent <= BUDGET, "budget differs from model or overspent");
        require(app.epsilonRemaining() == BUDGET - spent, "remaining budget");
    }

    // ------------------------------------------------------------------ helpers

    function _modelAllowed(uint256 h) internal view returns (bool) {
        return !revoked[h] && _popcount(approvedMask[h]) >= k;
    }

    function _hash(uint256 h) internal pure returns (bytes32) {
        return keccak256(abi.encode("compose", h));
    }

    function _actor(uint256 index) internal view returns (address) {
        if (index < n) return ownerList[index];
        return index == n ? outsider : kms;
    }

    function _isOwner(address account) internal view returns (bool) {
        return _ownerIndex(account) < n;
    }

    /// @dev Index of `account` among the owners, or n if it is none of them.
    function _ownerIndex(address account) internal view returns (uint256 i) {
        for (i = 0; i < n; i++) {
            if (ownerList[i] == account) return i;
        }
    }

    function _ownersIn(uint256 mask) internal view returns (address[] memory list) {
        list = new address[](_popcount(mask));
        uint256 next;
        for (uint256 i = 0; i < n; i++) {
            if (mask & (1 << i) != 0) list[next++] = ownerList[i];
        }
    }

    function _popcount(uint256 mask) internal pure returns (uint256 count) {
        for (; mask != 0; mask &= mask - 1) {
            count++;
        }
    }

    function _lowestBit(uint256 mask) internal pure returns (uint256 i) {
        while (mask & (1 << i) == 0) {
            i++;
        }
    }
}
