// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

/// @notice What the KMS learned about a booting CVM, as dstack's `IAppAuth.sol` defines it
/// (field order and types are part of the ABI: keep them exactly as dstack has them).
struct AppBootInfo {
    address appId;
    bytes32 composeHash;
    address instanceId;
    bytes32 deviceId;
    bytes32 mrAggregated;
    bytes32 mrSystem;
    bytes32 osImageHash;
    string tcbStatus;
    string[] advisoryIds;
}

/// @notice dstack's app-authorisation interface; ERC-165 id 0x1e079198.
interface IAppAuth {
    function isAppAllowed(AppBootInfo calldata bootInfo) external view returns (bool isAllowed, string memory reason);
}

/// @notice ERC-165 (https://eips.ethereum.org/EIPS/eip-165); id 0x01ffc9a7.
interface IERC165 {
    function supportsInterface(bytes4 interfaceId) external view returns (bool);
}
