// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {DstackApp} from "../src/DstackApp.sol";
import {SealroomTest} from "./Base.t.sol";

/// @dev The privacy budget: spent only by the KMS signer, through recorded releases, never overspent.
contract DstackAppBudgetTest is SealroomTest {
    DstackApp internal app; // 3 owners, k = 2; HASH approved by owners 0 and 1, not by owner 2

    function setUp() public {
        app = _deployApp(3, 2);
        app.proposeComposeHash(HASH, URI);
        _approveBy(app, HASH, 0);
        _approveBy(app, HASH, 1);
    }

    function _consenting() internal pure returns (address[] memory list) {
        list = new address[](2);
        list[0] = _owner(0);
        list[1] = _owner(1);
    }

    function _release(bytes32 releaseId, uint256 epsilon) internal {
        vm.prank(kms);
        app.recordRelease(releaseId, HASH, _consenting(), epsilon);
    }

    function test_RecordRelease_SpendsAndRecords() public {
        vm.roll(42);
        vm.expectEmit(address(app));
        emit DstackApp.BudgetSpent(bytes32("r1"), HASH, _consenting(), 1_000_000, BUDGET - 1_000_000);
        _release("r1", 1_000_000);

        require(app.epsilonSpent() == 1_000_000 && app.epsilonRemaining() == BUDGET - 1_000_000, "budget views");
        require(app.releaseCount() == 1, "release count");
        (bytes32 releaseId, bytes32 composeHash, address[] memory owners, uint256 epsilon, uint256 blockNumber) =
            app.releaseAt(0);
        require(releaseId == "r1" && composeHash == HASH && epsilon == 1_000_000 && blockNumber == 42, "release");
        require(owners.length == 2 && owners[0] == _owner(0) && owners[1] == _owner(1), "release owners");
    }

    function test_RecordRelease_ExactlyExhaustsThenRefuses() public {
        _release("all", BUDGET);
        require(app.epsilonRemaining() == 0, "exhausted");
        vm.expectRevert(abi.encodeWithSelector(DstackApp.BudgetExceeded.selector, 1, 0));
        _release("one more", 1);
    }

    function test_RecordRelease_NeverOverspent(uint256 first, uint256 second) public {
        first = _bound(first, 1, BUDGET);
        second = _bound(second, 1, 2 * BUDGET);
        _release("first", first);
        uint256 remaining = BUDGET - first;
        if (second > remaining) {
            vm.expectRevert(abi.encodeWithSelector(DstackApp.BudgetExceeded.selector, second, remaining));
            _release("second", second);
            require(app.epsilonSpent() == first && app.releaseCount() == 1, "failed release spent budget");
        } else {
            _release("second", second);
            require(app.epsilonSpent() == first + second && app.releaseCount() == 2, "spend recorded");
        }
        require(app.epsilonSpent() + app.epsilonRemaining() == BUDGET, "spent + remaining == budget");
    }

    function test_RecordRelease_OverBudgetFirstRelease(uint256 epsilon) public {
        epsilon = _bound(epsilon, BUDGET + 1, type(uint256).max);
        vm.expectRevert(abi.encodeWithSelector(DstackApp.BudgetExceeded.selector, epsilon, BUDGET));
        _release("too much", epsilon);
    }

    function test_RecordRelease_NotKmsSigner(address caller) public {
        vm.assume(caller != kms);
        address[] memory consenting = _consenting();
        vm.expectRevert(abi.encodeWithSelector(DstackApp.NotKmsSigner.selector, caller));
        vm.prank(caller);
        app.recordRelease("r", HASH, consenting, 1);
    }

    function test_RecordRelease_BelowThreshold() public {
        app.proposeComposeHash(OTHER_HASH, URI);
        _approveBy(app, OTHER_HASH, 0);
        address[] memory justOwner0 = new address[](1);
        justOwner0[0] = _owner(0);
        vm.expectRevert(abi.encodeWithSelector(DstackApp.ComposeHashNotAllowed.selector, OTHER_HASH));
        vm.prank(kms);
        app.recordRelease("r", OTHER_HASH, justOwner0, 1);
    }

    function test_RecordRelease_UnproposedHash() public {
        address[] memory consenting = _consenting();
        vm.expectRevert(abi.encodeWithSelector(DstackApp.ComposeHashNotAllowed.selector, OTHER_HASH));
        vm.prank(kms);
        app.recordRelease("r", OTHER_HASH, consenting, 1);
    }

    function test_RecordRelease_RevokedHash() public {
        vm.prank(_owner(2));
        app.revokeComposeHash(HASH);
        address[] memory consenting = _consenting();
        vm.expectRevert(abi.encodeWithSelector(DstackApp.ComposeHashIsRevoked.selector, HASH));
        vm.prank(kms);
        app.recordRelease("r", HASH, consenting, 1);
    }

    function test_RecordRelease_OwnerWhoDidNotApprove() public {
        // Threshold met by owners 0 and 1; owner 2 never consented, so their data must not be released.
        address[] memory withOwner2 = new address[](2);
        withOwner2[0] = _owner(0);
        withOwner2[1] = _owner(2);
        vm.expectRevert(abi.encodeWithSelector(DstackApp.OwnerDidNotApprove.selector, HASH, _owner(2)));
        vm.prank(kms);
        app.recordRelease("r", HASH, withOwner2, 1);
    }

    function test_RecordRelease_NonOwner(address stranger) public {
        vm.assume(!app.isOwner(stranger));
        address[] memory list = new address[](1);
        list[0] = stranger;
        vm.expectRevert(abi.encodeWithSelector(DstackApp.OwnerDidNotApprove.selector, HASH, stranger));
        vm.prank(kms);
        app.recordRelease("r", HASH, list, 1);
    }

    function test_RecordRelease_DuplicateOwner() public {
        address[] memory twice = new address[](2);
        twice[0] = _owner(1);
        twice[1] = _owner(1);
        vm.expectRevert(abi.encodeWithSelector(DstackApp.DuplicateOwner.selector, _owner(1)));
        vm.prank(kms);
        app.recordRelease("r", HASH, twice, 1);
    }

    function test_RecordRelease_EmptyOwners() public {
        address[] memory none = new address[](0);
        vm.expectRevert(DstackApp.EmptyRelease.selector);
        vm.prank(kms);
        app.recordRelease("r", HASH, none, 1);
    }

    function test_RecordRelease_ZeroEpsilon() public {
        address[] memory consenting = _consenting();
        vm.expectRevert(DstackApp.EmptyRelease.selector);
        vm.prank(kms);
        app.recordRelease("r", HASH, consenting, 0);
    }

    function test_RecordRelease_ReleaseIdReused() public {
        _release("r", 1);
        vm.expectRevert(abi.encodeWithSelector(DstackApp.ReleaseAlreadyRecorded.selector, bytes32("r")));
        _release("r", 1);
        require(app.epsilonSpent() == 1 && app.releaseCount() == 1, "replayed release counted");
    }

    function test_RecordRelease_LateConsentAllowsRelease() public {
        _approveBy(app, HASH, 2);
        address[] memory all = _owners(3);
        vm.prank(kms);
        app.recordRelease("r", HASH, all, 1);
        (,, address[] memory owners,,) = app.releaseAt(0);
        require(owners.length == 3 && owners[2] == _owner(2), "all three owners released");
    }

    function test_ReleaseAt_OutOfRange() public {
        _release("r", 1);
        vm.expectRevert(abi.encodeWithSignature("Panic(uint256)", 0x32));
        app.releaseAt(1);
    }
}
