// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {AppBootInfo} from "../src/IAppAuth.sol";
import {DstackApp} from "../src/DstackApp.sol";

/// @dev The forge cheat codes these tests use (no forge-std is available offline); signatures must match
/// forge's exactly, since the cheat-code address dispatches on the selector.
interface Vm {
    struct Log {
        bytes32[] topics;
        bytes data;
        address emitter;
    }

    function prank(address sender) external;
    function startPrank(address sender) external;
    function stopPrank() external;
    function expectRevert(bytes calldata revertData) external;
    function expectRevert(bytes4 revertData) external;
    function expectEmit(address emitter) external;
    function recordLogs() external;
    function getRecordedLogs() external returns (Log[] memory logs);
    function warp(uint256 newTimestamp) external;
    function roll(uint256 newHeight) external;
    function chainId(uint256 newChainId) external;
    function sign(uint256 privateKey, bytes32 digest) external pure returns (uint8 v, bytes32 r, bytes32 s);
    function addr(uint256 privateKey) external pure returns (address);
    function assume(bool condition) external pure;
}

/// @dev Shared fixtures: owners with known keys, app deployment, boot infos and small assertion helpers.
abstract contract SealroomTest {
    Vm internal constant vm = Vm(address(uint160(uint256(keccak256("hevm cheat code")))));

    uint256 internal constant MAX_OWNERS = 8;
    uint256 internal constant BUDGET = 3_000_000; // 3 ε in micro-epsilon
    bytes32 internal constant HASH = keccak256("app-compose.json v1");
    bytes32 internal constant OTHER_HASH = keccak256("app-compose.json v2");
    string internal constant URI = "https://studies.example/app-compose.json";
    uint256 internal constant SECP256K1_ORDER = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141;

    address internal kms = address(0xC0FFEE);
    address internal outsider = address(0xBAD);

    function _ownerKey(uint256 index) internal pure returns (uint256) {
        return 0xA11CE + index;
    }

    function _owner(uint256 index) internal pure returns (address) {
        return vm.addr(_ownerKey(index));
    }

    function _owners(uint256 n) internal pure returns (address[] memory list) {
        list = new address[](n);
        for (uint256 i = 0; i < n; i++) {
            list[i] = _owner(i);
        }
    }

    function _deployApp(uint256 n, uint256 k) internal returns (DstackApp) {
        return new DstackApp(_owners(n), k, BUDGET, kms, true);
    }

    function _approveBy(DstackApp app, bytes32 composeHash, uint256 ownerIndex) internal {
        vm.prank(_owner(ownerIndex));
        app.approveComposeHash(composeHash);
    }

    /// @dev Signs `app.approvalDigest` as owner `ownerIndex`; returns r || s || v with v in {27, 28}.
    function _signApproval(DstackApp app, bytes32 composeHash, uint256 deadline, uint256 ownerIndex)
        internal
        view
        returns (bytes memory)
    {
        (uint8 v, bytes32 r, bytes32 s) = vm.sign(_ownerKey(ownerIndex), app.approvalDigest(composeHash, deadline));
        return abi.encodePacked(r, s, v);
    }

    function _bootInfo(address appId, bytes32 composeHash, string memory tcbStatus)
        internal
        pure
        returns (AppBootInfo memory info)
    {
        info.appId = appId;
        info.composeHash = composeHash;
        info.instanceId = address(0x1D);
        info.deviceId = keccak256("device");
        info.mrAggregated = keccak256("mr-aggregated");
        info.mrSystem = keccak256("mr-system");
        info.osImageHash = keccak256("os-image");
        info.tcbStatus = tcbStatus;
        info.advisoryIds = new string[](0);
    }

    function _bound(uint256 x, uint256 min, uint256 max) internal pure returns (uint256) {
        return min + (x % (max - min + 1));
    }

    function _assertVerdict(bool allowed, string memory reason, bool wantAllowed, string memory wantReason)
        internal
        pure
    {
        require(allowed == wantAllowed, string.concat("verdict differs; reason: ", reason));
        require(
            keccak256(bytes(reason)) == keccak256(bytes(wantReason)),
            string.concat("reason \"", reason, "\" != \"", wantReason, "\"")
        );
    }
}
