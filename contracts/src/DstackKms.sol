// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {AppBootInfo, IAppAuth, IERC165} from "./IAppAuth.sol";

/// @title DstackKms — the KMS registry
/// @notice Shaped like dstack's `DstackKms`: it publishes the KMS root (k256 public key auditors pin), the OS
/// images the KMS accepts and the registered apps, and its `isAppAllowed` checks those before delegating to
/// the app's own contract. Not upgradeable (dstack's is a UUPS proxy): the registry's owner manages OS images
/// and the KMS info, and nothing else.
contract DstackKms is IAppAuth, IERC165 {
    error NotKmsOwner(address caller);
    error NoCodeAtApp(address appId);

    event KmsInfoSet(bytes k256Pubkey);
    event AppRegistered(address appId);
    event OsImageHashAdded(bytes32 osImageHash);
    event OsImageHashRemoved(bytes32 osImageHash);

    struct KmsInfo {
        bytes k256Pubkey;
        bytes caPubkey;
        bytes quote;
        bytes eventlog;
    }

    address public immutable owner;
    KmsInfo private _kmsInfo;
    mapping(address => bool) public registeredApps;
    mapping(bytes32 => bool) public allowedOsImages;

    constructor(address owner_) {
        owner = owner_;
    }

    modifier onlyOwner() {
        if (msg.sender != owner) revert NotKmsOwner(msg.sender);
        _;
    }

    function kmsInfo()
        external
        view
        returns (bytes memory k256Pubkey, bytes memory caPubkey, bytes memory quote, bytes memory eventlog)
    {
        return (_kmsInfo.k256Pubkey, _kmsInfo.caPubkey, _kmsInfo.quote, _kmsInfo.eventlog);
    }

    /// @notice Publish the KMS root: its k256 public key, CA public key, and the quote and event log of the
    /// KMS's own CVM.
    function setKmsInfo(KmsInfo calldata info) external onlyOwner {
        _kmsInfo = info;
        emit KmsInfoSet(info.k256Pubkey);
    }

    /// @notice Register an app contract (permissionless, as in dstack); it must already be deployed.
    function registerApp(address appId) external {
        if (appId.code.length == 0) revert NoCodeAtApp(appId);
        registeredApps[appId] = true;
        emit AppRegistered(appId);
    }

    function addOsImageHash(bytes32 osImageHash) external onlyOwner {
        allowedOsImages[osImageHash] = true;
        emit OsImageHashAdded(osImageHash);
    }

    function removeOsImageHash(bytes32 osImageHash) external onlyOwner {
        allowedOsImages[osImageHash] = false;
        emit OsImageHashRemoved(osImageHash);
    }

    /// @notice dstack's boot check: the app must be registered and its OS image allowed; then the app's own
    /// contract decides (and gives its own reason).
    function isAppAllowed(AppBootInfo calldata bootInfo) external view returns (bool isAllowed, string memory reason) {
        if (!registeredApps[bootInfo.appId]) return (false, "App not registered");
        if (!allowedOsImages[bootInfo.osImageHash]) return (false, "OS image is not allowed");
        return IAppAuth(bootInfo.appId).isAppAllowed(bootInfo);
    }

    function supportsInterface(bytes4 interfaceId) external pure returns (bool) {
        return interfaceId == type(IERC165).interfaceId || interfaceId == type(IAppAuth).interfaceId;
    }
}
