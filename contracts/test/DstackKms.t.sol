// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {AppBootInfo, IAppAuth} from "../src/IAppAuth.sol";
import {DstackApp} from "../src/DstackApp.sol";
import {DstackKms} from "../src/DstackKms.sol";
import {SealroomTest} from "./Base.t.sol";

contract DstackKmsTest is SealroomTest {
    address internal kmsOwner = address(0x0A11);
    DstackKms internal registry;
    DstackApp internal app; // 2 owners, k = 1; HASH proposed, not yet approved
    bytes32 internal osImage = keccak256("os-image"); // the one _bootInfo reports

    function setUp() public {
        registry = new DstackKms(kmsOwner);
        app = _deployApp(2, 1);
        app.proposeComposeHash(HASH, URI);
    }

    function _readyToBoot() internal {
        registry.registerApp(address(app));
        vm.prank(kmsOwner);
        registry.addOsImageHash(osImage);
        _approveBy(app, HASH, 0);
    }

    function _info() internal pure returns (DstackKms.KmsInfo memory) {
        return DstackKms.KmsInfo({
            k256Pubkey: hex"02a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f90",
            caPubkey: hex"04cafe",
            quote: hex"0400020081",
            eventlog: bytes("[]")
        });
    }

    // ------------------------------------------------------------------ KMS info and OS images

    function test_Constructor_SetsOwner() public view {
        require(registry.owner() == kmsOwner, "owner");
    }

    function test_SetKmsInfo_StoresAndEmits() public {
        DstackKms.KmsInfo memory info = _info();
        vm.expectEmit(address(registry));
        emit DstackKms.KmsInfoSet(info.k256Pubkey);
        vm.prank(kmsOwner);
        registry.setKmsInfo(info);

        (bytes memory k256Pubkey, bytes memory caPubkey, bytes memory quote, bytes memory eventlog) = registry.kmsInfo();
        require(keccak256(k256Pubkey) == keccak256(info.k256Pubkey), "k256 pubkey");
        require(keccak256(caPubkey) == keccak256(info.caPubkey), "ca pubkey");
        require(keccak256(quote) == keccak256(info.quote), "quote");
        require(keccak256(eventlog) == keccak256(info.eventlog), "event log");
    }

    function test_SetKmsInfo_NotOwner(address caller) public {
        vm.assume(caller != kmsOwner);
        DstackKms.KmsInfo memory info = _info();
        vm.expectRevert(abi.encodeWithSelector(DstackKms.NotKmsOwner.selector, caller));
        vm.prank(caller);
        registry.setKmsInfo(info);
    }

    function test_AddOsImageHash_AllowsAndEmits() public {
        vm.expectEmit(address(registry));
        emit DstackKms.OsImageHashAdded(osImage);
        vm.prank(kmsOwner);
        registry.addOsImageHash(osImage);
        require(registry.allowedOsImages(osImage), "image allowed");
    }

    function test_AddOsImageHash_NotOwner(address caller) public {
        vm.assume(caller != kmsOwner);
        vm.expectRevert(abi.encodeWithSelector(DstackKms.NotKmsOwner.selector, caller));
        vm.prank(caller);
        registry.addOsImageHash(osImage);
    }

    function test_RemoveOsImageHash_DisallowsAndEmits() public {
        vm.startPrank(kmsOwner);
        registry.addOsImageHash(osImage);
        vm.expectEmit(address(registry));
        emit DstackKms.OsImageHashRemoved(osImage);
        registry.removeOsImageHash(osImage);
        vm.stopPrank();
        require(!registry.allowedOsImages(osImage), "image still allowed");
    }

    function test_RemoveOsImageHash_NotOwner(address caller) public {
        vm.assume(caller != kmsOwner);
        vm.expectRevert(abi.encodeWithSelector(DstackKms.NotKmsOwner.selector, caller));
        vm.prank(caller);
        registry.removeOsImageHash(osImage);
    }

    // ------------------------------------------------------------------ app registration

    function test_RegisterApp_PermissionlessAndEmits() public {
        vm.expectEmit(address(registry));
        emit DstackKms.AppRegistered(address(app));
        vm.prank(outsider);
        registry.registerApp(address(app));
        require(registry.registeredApps(address(app)), "registered");
    }

    function test_RegisterApp_NoCode(address appId) public {
        vm.assume(appId.code.length == 0);
        vm.expectRevert(abi.encodeWithSelector(DstackKms.NoCodeAtApp.selector, appId));
        registry.registerApp(appId);
    }

    // ------------------------------------------------------------------ isAppAllowed and delegation

    function test_IsAppAllowed_Allowed() public {
        _readyToBoot();
        (bool ok, string memory reason) = registry.isAppAllowed(_bootInfo(address(app), HASH, "UpToDate"));
        _assertVerdict(ok, reason, true, "");
    }

    function test_IsAppAllowed_AppNotRegistered() public {
        vm.prank(kmsOwner);
        registry.addOsImageHash(osImage);
        _approveBy(app, HASH, 0);
        (bool ok, string memory reason) = registry.isAppAllowed(_bootInfo(address(app), HASH, "UpToDate"));
        _assertVerdict(ok, reason, false, "App not registered");
    }

    function test_IsAppAllowed_OsImageNotAllowed() public {
        _readyToBoot();
        AppBootInfo memory boot = _bootInfo(address(app), HASH, "UpToDate");
        boot.osImageHash = keccak256("other os image");
        (bool ok, string memory reason) = registry.isAppAllowed(boot);
        _assertVerdict(ok, reason, false, "OS image is not allowed");
    }

    function test_IsAppAllowed_OsImageRemoved() public {
        _readyToBoot();
        vm.prank(kmsOwner);
        registry.removeOsImageHash(osImage);
        (bool ok, string memory reason) = registry.isAppAllowed(_bootInfo(address(app), HASH, "UpToDate"));
        _assertVerdict(ok, reason, false, "OS image is not allowed");
    }

    function test_IsAppAllowed_DelegatesComposeHashNotAllowed() public {
        _readyToBoot();
        (bool ok, string memory reason) = registry.isAppAllowed(_bootInfo(address(app), OTHER_HASH, "UpToDate"));
        _assertVerdict(ok, reason, false, "Compose hash not allowed");
    }

    function test_IsAppAllowed_DelegatesRevocation() public {
        _readyToBoot();
        vm.prank(_owner(1));
        app.revokeComposeHash(HASH);
        (bool ok, string memory reason) = registry.isAppAllowed(_bootInfo(address(app), HASH, "UpToDate"));
        _assertVerdict(ok, reason, false, "Compose hash revoked");
    }

    function test_IsAppAllowed_DelegatesTcbCheck() public {
        _readyToBoot();
        (bool ok, string memory reason) = registry.isAppAllowed(_bootInfo(address(app), HASH, "OutOfDate"));
        _assertVerdict(ok, reason, false, "TCB status is not up to date");
    }

    function test_IsAppAllowed_RegistryChecksComeFirst() public {
        // Revoked and unregistered: the registry answers before asking the app.
        vm.prank(_owner(0));
        app.revokeComposeHash(HASH);
        (bool ok, string memory reason) = registry.isAppAllowed(_bootInfo(address(app), HASH, "UpToDate"));
        _assertVerdict(ok, reason, false, "App not registered");
    }

    function test_SupportsInterface_Erc165AndAppAuth(bytes4 other) public view {
        vm.assume(other != 0x01ffc9a7 && other != 0x1e079198);
        require(registry.supportsInterface(0x01ffc9a7), "ERC-165");
        require(registry.supportsInterface(type(IAppAuth).interfaceId), "IAppAuth");
        require(!registry.supportsInterface(other), "unexpected interface");
    }
}
